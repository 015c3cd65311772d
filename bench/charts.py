"""Charts of a benchmark run (bench/results/bench-<time>.json), drawn with matplotlib.

Per protocol, every server on one chart:

* the load sweep: delivered against offered rate, and p50/p99 latency against offered rate
  (topics: S1's ramp, deliveries per second; relay: S14's pipe sweep, frames per second);
* memory against connection count: the servers' RSS growth while idle connections are opened
  (S12, S15 and S17 in five stages; S3 and S9 before and after).

``python bench/charts.py bench/results/bench-<time>.json [out-dir]``; bench.py calls ``draw``
after every run. The last round of each target is drawn.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

Json = dict[str, Any]

# protocol -> (sweep scenario, x/y unit, memory scenarios)
PROTOCOLS: dict[str, tuple[str | None, str, tuple[str, ...]]] = {
    "topics": ("S1", "deliveries/s", ("S3",)),
    "relay": ("S14", "frames/s (1 KiB, 100 pipes)", ("S12",)),
    "signal-fire": (None, "", ("S15",)),
    "peerjs": (None, "", ("S9",)),
    "rooms": (None, "", ("S17",)),
}


def _last(results: list[Json], scenario: str) -> dict[str, Json]:
    """target -> its last successful result of ``scenario``."""
    found: dict[str, Json] = {}
    for r in results:
        if r.get("scenario") == scenario and "error" not in r:
            found[r["target"]] = r
    return found


def _sweep_points(scenario: str, r: Json) -> list[tuple[float, float, float | None, float | None]]:
    """(offered, delivered, p50, p99) per step."""
    if scenario == "S1":
        fanout = 10.0
        return [
            (
                st["offeredPublishesPerSecond"] * fanout,
                st["deliveredPerSecond"],
                st.get("p50Ms"),
                st.get("p99Ms"),
            )
            for st in r.get("steps", [])
        ]
    return [
        (st["offeredPerSecond"], st["deliveredPerSecond"], st.get("p50Ms"), st.get("p99Ms"))
        for st in r.get("steps", [])
    ]


def draw(path: Path, out: Path) -> list[Path]:
    data: Json = json.loads(Path(path).read_text())
    results: list[Json] = data.get("results", [])
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for protocol, (sweep, unit, memory) in PROTOCOLS.items():
        if sweep is not None:
            runs = _last(results, sweep)
            if runs:
                fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
                for target, r in runs.items():
                    points = _sweep_points(sweep, r)
                    if not points:
                        continue
                    offered = [p[0] for p in points]
                    left.plot(offered, [p[1] for p in points], marker="o", label=target)
                    (line,) = right.plot(
                        offered, [p[2] for p in points], marker="o", label=f"{target} p50"
                    )
                    right.plot(
                        offered,
                        [p[3] for p in points],
                        marker="x",
                        linestyle="--",
                        color=line.get_color(),
                        label=f"{target} p99",
                    )
                top = max((p[0] for r in runs.values() for p in _sweep_points(sweep, r)), default=1)
                left.plot([0, top], [0, top], color="grey", linewidth=0.6, label="offered")
                left.set(xlabel=f"offered {unit}", ylabel=f"delivered {unit}")
                left.set_title(f"{protocol} ({sweep}): delivered vs offered")
                right.set(xlabel=f"offered {unit}", ylabel="latency ms", yscale="log")
                right.set_title(f"{protocol} ({sweep}): p50 / p99 latency")
                left.legend(fontsize=8)
                right.legend(fontsize=7)
                fig.tight_layout()
                target_path = out / f"{protocol}-sweep.png"
                fig.savefig(target_path, dpi=110)
                plt.close(fig)
                written.append(target_path)
        curves: dict[str, list[tuple[int, int]]] = {}
        for scenario in memory:
            for target, r in _last(results, scenario).items():
                curve = r.get("rssCurve") or [
                    (0, r.get("rssBeforeBytes", 0)),
                    (r.get("open", 0), r.get("rssAfterBytes", 0)),
                ]
                if len(curve) >= 2:
                    curves[f"{target} ({scenario})"] = [(int(n), int(b)) for n, b in curve]
        if curves:
            fig, ax = plt.subplots(figsize=(6.5, 4.2))
            for label, curve in curves.items():
                base = curve[0][1]
                ax.plot(
                    [n for n, _ in curve],
                    [(b - base) / 2**20 for _, b in curve],
                    marker="o",
                    label=label,
                )
            ax.set(xlabel="open connections", ylabel="server RSS growth, MiB")
            ax.set_title(f"{protocol}: memory against connection count")
            ax.legend(fontsize=8)
            fig.tight_layout()
            target_path = out / f"{protocol}-memory.png"
            fig.savefig(target_path, dpi=110)
            plt.close(fig)
            written.append(target_path)
    return written


if __name__ == "__main__":
    source = Path(sys.argv[1])
    target = Path(sys.argv[2]) if len(sys.argv) > 2 else source.with_suffix("")
    for written in draw(source, target):
        print(written)
