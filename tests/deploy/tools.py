"""What the deploy tests share: the shipped deploy/ files, a real nginx started from a config the
test writes, and the sdist and wheel built from the tree once per session."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from support import ROOT, UNIT, free_port, require

DEPLOY = ROOT / "deploy"
VENV_BIN = Path(sys.executable).parent


def venv_tool(name: str) -> str | None:
    """A tool the test extra installs into the venv (shellcheck, hadolint, twine, ...)."""
    candidate = VENV_BIN / name
    return str(candidate) if candidate.exists() else shutil.which(name)


def require_venv_tool(name: str, package: str) -> str:
    tool = venv_tool(name)
    require(tool is not None, f"{name} is not installed: pip install {package} (the test extra)")
    assert tool is not None
    return tool


# --- nginx ---------------------------------------------------------------------------------------

# The main context a distribution's /etc/nginx/nginx.conf provides, with every file nginx writes
# in the test's own directory; the shipped deploy/nginx.conf is included in its http context as
# /etc/nginx/conf.d/*.conf is.
NGINX_MAIN = """
daemon off;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    include {dir}/polysignal.conf;
}}
"""

UPSTREAM_SERVER = re.compile(r"^([ \t]*)server [^\s;]+:\d+[^;\n]*;[ \t]*\n", re.MULTILINE)
LISTEN = re.compile(r"^([ \t]*)listen 80;", re.MULTILINE)


def shipped_nginx_conf(listen: str, upstreams: list[str]) -> str:
    """deploy/nginx.conf with only its `listen` port and its upstream `server` lines changed."""
    text = (DEPLOY / "nginx.conf").read_text()
    servers = list(UPSTREAM_SERVER.finditer(text))
    assert len(servers) == 2, "deploy/nginx.conf: expected the two upstream server lines"
    indent = servers[0].group(1)
    lines = "".join(f"{indent}server {address};\n" for address in upstreams)
    # The first server line becomes ours, the second goes.
    text = text[: servers[0].start()] + lines + text[servers[1].end() :]
    assert servers[0].end() == servers[1].start(), "the upstream server lines must be adjacent"
    text, count = LISTEN.subn(rf"\1listen {listen};", text)
    assert count == 1, "deploy/nginx.conf: expected one `listen 80;` line"
    return text


def nginx_binary() -> str | None:
    found = shutil.which("nginx")
    if found:
        return found
    return "/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK) else None


def require_nginx() -> str:
    binary = nginx_binary()
    require(
        binary is not None, "nginx is not installed: `apt-get install nginx` (scripts/test does)"
    )
    assert binary is not None
    return binary


def nginx_workdir(site: str) -> Path:
    workdir = Path(tempfile.mkdtemp(prefix="polysignal-deploy-nginx-"))
    workdir.chmod(0o755)  # nginx's worker may run as another user
    (workdir / "polysignal.conf").write_text(site)
    (workdir / "nginx.conf").write_text(NGINX_MAIN.format(dir=workdir))
    return workdir


def nginx_args(workdir: Path) -> list[str]:
    """nginx's own prefix, error log and config in ``workdir``."""
    return ["-p", str(workdir), "-e", str(workdir / "error.log"), "-c", str(workdir / "nginx.conf")]


def nginx_test(site: str) -> subprocess.CompletedProcess[str]:
    """`nginx -t` of ``site`` in the main context above."""
    workdir = nginx_workdir(site)
    try:
        return subprocess.run(
            [require_nginx(), "-t", *nginx_args(workdir)],
            capture_output=True,
            text=True,
            timeout=20 * UNIT,
            check=False,
        )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


@dataclass
class Nginx:
    port: int
    workdir: Path
    proc: subprocess.Popen[bytes]

    def log(self) -> str:
        return (self.workdir / "error.log").read_text(errors="replace")


@contextlib.contextmanager
def running_nginx(upstreams: list[str]) -> Iterator[Nginx]:
    """The shipped deploy/nginx.conf in a real nginx on a free loopback port, in front of
    ``upstreams``; stopped by its PID (SIGTERM, nginx's fast shutdown) afterwards."""
    binary = require_nginx()
    port = free_port()
    workdir = nginx_workdir(shipped_nginx_conf(f"127.0.0.1:{port}", upstreams))
    proc = subprocess.Popen(
        [binary, *nginx_args(workdir)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    nginx = Nginx(port, workdir, proc)
    try:
        deadline = time.monotonic() + 10 * UNIT
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"nginx exited with {proc.returncode}:\n{nginx.log()}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                assert time.monotonic() < deadline, f"nginx did not listen:\n{nginx.log()}"
                time.sleep(0.05)
        yield nginx
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10 * UNIT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(workdir, ignore_errors=True)


# --- the sdist and the wheel ---------------------------------------------------------------------


@dataclass(frozen=True)
class Dists:
    sdist: Path
    wheel: Path


@pytest.fixture(scope="session")
def dists(tmp_path_factory: pytest.TempPathFactory) -> Dists:
    """The sdist and the wheel of the tree, as `python -m build` makes them for PyPI (the wheel
    built from the sdist, so a file the sdist lacks breaks the wheel too)."""
    require(
        subprocess.run(
            [sys.executable, "-c", "import build"], capture_output=True, check=False
        ).returncode
        == 0,
        "`build` is not installed: pip install build (the test extra)",
    )
    out = tmp_path_factory.mktemp("dist")
    done = subprocess.run(
        [sys.executable, "-m", "build", "--outdir", str(out), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=180 * UNIT,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    (sdist,) = out.glob("polysignal-*.tar.gz")
    (wheel,) = out.glob("polysignal-*.whl")
    return Dists(sdist, wheel)
