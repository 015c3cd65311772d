"""``polysignal package-lambda``: the deployment zip of the Lambda handler.

The zip holds only the pure-Python modules the handler imports; the Lambda Python runtime ships
boto3, and the topics codec falls back to the standard library's JSON where orjson is absent
(``polysignal.protocols.jsonwire``), so the same zip runs on x86_64 and arm64 and on every
supported Python. Entries are sorted and dated 1980-01-01, so the same code gives the same bytes.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import polysignal

# Everything `polysignal.serverless.handler` imports, relative to the package's parent directory.
LAMBDA_FILES: tuple[str, ...] = (
    "polysignal/__init__.py",
    "polysignal/config.py",
    "polysignal/core/__init__.py",
    "polysignal/core/errors.py",
    "polysignal/core/topics.py",
    "polysignal/protocols/__init__.py",
    "polysignal/protocols/jsonwire.py",
    "polysignal/protocols/topics.py",
    "polysignal/serverless/__init__.py",
    "polysignal/serverless/aws.py",
    "polysignal/serverless/sender.py",
    "polysignal/serverless/service.py",
    "polysignal/serverless/settings.py",
    "polysignal/serverless/store.py",
)

_EPOCH = (1980, 1, 1, 0, 0, 0)


def build_zip(out: Path) -> list[str]:
    """Write the deployment zip to ``out`` (parents created); return its entry names."""
    root = Path(polysignal.__file__).resolve().parent.parent
    out.parent.mkdir(parents=True, exist_ok=True)
    names = sorted(LAMBDA_FILES)
    tmp = out.with_name(out.name + ".tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        for name in names:
            info = zipfile.ZipInfo(name, date_time=_EPOCH)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, (root / name).read_bytes())
    tmp.replace(out)
    return names
