"""The package as PyPI would get it: the sdist and the wheel built from the tree (`python -m
build`), checked by twine, carrying the license, the third-party notices and the SAM template,
with complete metadata and one version; and the wheel installed into a fresh venv outside the
tree (its dependencies from the index pip is configured with) serving the topics protocol, the
rooms demo and the Signal-Fire browser client, and writing the Lambda zip with its template."""

from __future__ import annotations

import asyncio
import email
import os
import re
import signal
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import aiohttp
import pytest

import polysignal
from deploy.tools import Dists, require_venv_tool
from polysignal import __version__

from support import ROOT, UNIT, free_port, receive_json

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


def wheel_metadata(wheel: Path) -> email.message.Message:
    with zipfile.ZipFile(wheel) as zf:
        (name,) = [n for n in zf.namelist() if n.endswith(".dist-info/METADATA")]
        return email.message_from_bytes(zf.read(name))


def test_twine_check_passes(dists: Dists):
    twine = require_venv_tool("twine", "twine")
    done = subprocess.run(
        [twine, "check", "--strict", str(dists.sdist), str(dists.wheel)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_sdist_and_wheel_carry_license_notices_and_template(dists: Dists):
    with zipfile.ZipFile(dists.wheel) as zf:
        wheel = {name: zf.read(name) for name in zf.namelist()}
    info = f"polysignal-{__version__}.dist-info"
    assert wheel[f"{info}/licenses/LICENSE"] == (ROOT / "LICENSE").read_bytes()
    notices = (ROOT / "THIRD_PARTY_NOTICES").read_bytes()
    assert wheel[f"{info}/licenses/THIRD_PARTY_NOTICES"] == notices
    template = (ROOT / "template.yaml").read_bytes()
    assert wheel["polysignal/serverless/template.yaml"] == template
    vendored = wheel["polysignal/static/vendor/socket.io.min.js"]
    header = re.match(rb"/\*!\n \* Socket\.IO v([\d.]+)\n", vendored)
    assert header is not None
    assert f"socket.io-client {header.group(1).decode()}".encode() in notices
    with tarfile.open(dists.sdist) as tf:
        base = f"polysignal-{__version__}/"
        names = set(tf.getnames())
        for name in ("LICENSE", "THIRD_PARTY_NOTICES", "CHANGELOG.md", "README.md"):
            assert base + name in names, name
        assert base + "src/polysignal/serverless/template.yaml" in names
        assert base + "src/polysignal/static/vendor/socket.io.min.js" in names
        assert not [n for n in names if "/tests/" in n or "__pycache__" in n]


def test_metadata_is_complete_with_one_version(dists: Dists):
    meta = wheel_metadata(dists.wheel)
    assert meta["Name"] == "polysignal" and meta["Version"] == __version__
    assert meta["License-Expression"] == "MIT"
    assert meta.get_all("License-File") == ["LICENSE", "THIRD_PARTY_NOTICES"]
    assert meta["Requires-Python"] == ">=3.11"
    assert meta["Author"] == "the polysignal authors"
    classifiers = meta.get_all("Classifier") or []
    assert "Programming Language :: Python :: 3.11" in classifiers
    assert not [c for c in classifiers if c.startswith("License ::")]  # the expression says it
    assert meta["Keywords"] and "webrtc" in meta["Keywords"]
    # Every runtime dependency has a lower bound; upper bounds only on the two whose private
    # internals server/socketio_compat.py relies on.
    runtime = [r for r in meta.get_all("Requires-Dist") or [] if "extra ==" not in r]
    assert runtime
    for requirement in runtime:
        assert ">=" in requirement, requirement
        upper = "<" in requirement.split(";")[0].replace("<=", "")
        assert upper == requirement.startswith(("python-socketio", "python-engineio")), requirement
    # One version: the package's __version__ is the metadata's, the CLI's, and the changelog's.
    assert re.search(rf"^## \[?{re.escape(__version__)}\]?", _changelog(), re.MULTILINE)
    cli = subprocess.run(
        [sys.executable, "-m", "polysignal", "--version"], capture_output=True, text=True
    )
    assert cli.stdout.strip() == f"polysignal {__version__}"
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'dynamic = ["version"]' in pyproject
    assert 'version = { attr = "polysignal.__version__" }' in pyproject


def _changelog() -> str:
    return (ROOT / "CHANGELOG.md").read_text()


@pytest.fixture(scope="module")
def installed(dists: Dists, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv outside the tree with the wheel installed, its dependencies from the index
    pip is configured with; returns its bin directory."""
    venv = tmp_path_factory.mktemp("installed") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    pip = [sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install"]
    done = subprocess.run(
        [*pip, "--quiet", "--no-compile", "--disable-pip-version-check", str(dists.wheel)],
        capture_output=True,
        text=True,
        timeout=180 * UNIT,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return venv / "bin"


def test_the_installed_package_is_the_wheel_not_the_tree(installed: Path):
    where = subprocess.run(
        [str(installed / "python"), "-c", "import polysignal; print(polysignal.__file__)"],
        capture_output=True,
        text=True,
        cwd=installed.parent.parent,
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
        check=True,
    ).stdout.strip()
    assert where.startswith(str(installed.parent)) and "site-packages" in where
    assert not where.startswith(str(Path(polysignal.__file__).parent))


async def test_the_installed_server_serves(installed: Path, tmp_path: Path):
    port = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
        "HOST": "127.0.0.1",
        "PORT": str(port),
        "ROOMS_DEV": "1",
        "LOG_LEVEL": "WARNING",
    }
    proc = await asyncio.create_subprocess_exec(
        str(installed / "polysignal"),
        "serve",
        env=env,
        cwd=tmp_path,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        async with aiohttp.ClientSession() as http:
            for _ in range(200):
                try:
                    async with http.get(base + "/readyz") as r:
                        if r.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                assert proc.returncode is None, "the installed server exited"
                await asyncio.sleep(0.05 * UNIT)
            async with http.ws_connect(f"ws://127.0.0.1:{port}/") as ws:
                await ws.send_str('{"type":"ping"}')
                assert await receive_json(ws) == {"type": "pong"}
            async with http.get(base + "/demo") as r:
                assert r.status == 200 and "/vendor/socket.io.min.js" in await r.text()
            async with http.get(base + "/vendor/socket.io.min.js") as r:
                assert r.status == 200 and (await r.text()).startswith("/*!\n * Socket.IO v")
            async with http.get(base + "/client/signal-fire.js") as r:
                assert r.status == 200 and "javascript" in r.headers["Content-Type"]
    finally:
        proc.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.wait_for(proc.communicate(), 15 * UNIT)
    assert proc.returncode == 0, stderr.decode()


def test_the_installed_package_writes_the_lambda_zip_and_template(installed: Path, tmp_path):
    done = subprocess.run(
        [str(installed / "polysignal"), "package-lambda", "--out", "sam/lambda.zip", "--template"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    )
    assert "wrote sam/template.yaml" in done.stdout
    template = (tmp_path / "sam" / "template.yaml").read_text()
    original = (ROOT / "template.yaml").read_text()
    assert template == original.replace("CodeUri: dist/lambda.zip", "CodeUri: lambda.zip")
    assert zipfile.ZipFile(tmp_path / "sam" / "lambda.zip").testzip() is None
