"""A real coturn for the TURN tests (tests/turn/): ``turnserver`` as a child process on a free
loopback port, in the ``use-auth-secret`` scheme with two static secrets (rotation: coturn accepts
a credential signed with any of its ``static-auth-secret`` lines). Started and stopped by the
``coturn`` fixture of tests/turn/conftest.py, by its PID."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from support import UNIT, free_port

REALM = "polysignal.test"
FIRST_SECRET = "first-turn-secret"
SECOND_SECRET = "second-turn-secret"

# A STUN Binding request (RFC 8489): type 0x0001, length 0, the magic cookie, a transaction id.
_COOKIE = bytes.fromhex("2112a442")
_BINDING = b"\x00\x01\x00\x00" + _COOKIE + b"polysignal!!"


class Coturn:
    """One ``turnserver`` of the tests: ``use-auth-secret`` with ``secrets``, UDP and TCP on
    127.0.0.1:``port``, relays on 127.0.0.1, loopback peers allowed; its log in ``log_path``."""

    def __init__(self, binary: str, secrets: tuple[str, ...] = (FIRST_SECRET, SECOND_SECRET)):
        self.binary = binary
        self.secrets = secrets
        self.port = _free_udp_and_tcp_port()
        self.dir = Path(tempfile.mkdtemp(prefix="polysignal-coturn-"))
        self.log_path = self.dir / "turnserver.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def uri(self) -> str:
        return f"turn:127.0.0.1:{self.port}?transport=udp"

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    def config(self) -> str:
        """The turnserver.conf of the tests (docs/operations/turn.md has the production one)."""
        lines = [
            "listening-ip=127.0.0.1",
            "relay-ip=127.0.0.1",
            f"listening-port={self.port}",
            "use-auth-secret",
            *(f"static-auth-secret={secret}" for secret in self.secrets),
            f"realm={REALM}",
            "fingerprint",
            "allow-loopback-peers",
            "no-cli",
            "no-tls",
            "no-dtls",
            "no-rfc5780",
            f"log-file={self.log_path}",
            "simple-log",
            "no-stdout-log",
            f"pidfile={self.dir / 'turnserver.pid'}",
            f"userdb={self.dir / 'turndb'}",  # its own, never the system's /var/lib/turn
        ]
        return "\n".join(lines) + "\n"

    def start(self) -> None:
        conf = self.dir / "turnserver.conf"
        conf.write_text(self.config())
        self.proc = subprocess.Popen(
            [self.binary, "-c", str(conf)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd=self.dir,
        )
        try:
            self._wait_answering(10 * UNIT)
        except BaseException:
            self.stop()
            raise

    def _wait_answering(self, timeout: float) -> None:
        """Until it answers a STUN Binding request on its UDP port (no fixed sleep)."""
        deadline = time.monotonic() + timeout
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.settimeout(0.1)
            while time.monotonic() < deadline:
                assert self.proc is not None
                if self.proc.poll() is not None:
                    raise RuntimeError(
                        f"turnserver exited with {self.proc.returncode}:\n{self.log()}"
                    )
                sock.sendto(_BINDING, self.address)
                with contextlib.suppress(TimeoutError, ConnectionRefusedError):
                    answer = sock.recv(1024)
                    if answer[:2] == b"\x01\x01" and answer[4:8] == _COOKIE:
                        return
        raise RuntimeError(f"turnserver not answering on {self.address}:\n{self.log()}")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5 * UNIT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        shutil.rmtree(self.dir, ignore_errors=True)


def _free_udp_and_tcp_port() -> int:
    """A loopback port free for both UDP and TCP (coturn listens on both)."""
    for _ in range(50):
        port = free_port()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            try:
                udp.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port for UDP and TCP")


def turnserver_binary() -> str | None:
    """coturn's ``turnserver`` (``TURNSERVER`` overrides; Debian's package installs it at
    /usr/bin/turnserver)."""
    path = os.environ.get("TURNSERVER") or shutil.which("turnserver") or "/usr/bin/turnserver"
    return path if Path(path).exists() else None
