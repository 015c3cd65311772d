"""Every misconfiguration stops ``polysignal`` at start with status 2 and one line on stderr
naming the setting, never a traceback (docs/operations.md, "Startup errors").

Each case runs the real command, ``python -m polysignal ...``, as a separate process.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from support import UNIT, free_port

pytestmark = pytest.mark.timeout(120)

USAGE = "use memory://, redis://host:port/db, rediss://host:port/db or unix:///path"
BOTH_SECRETS = (
    "the rooms protocol needs both (or neither, to stay off; ROOMS_DEV=1 for development)"
)


def polysignal(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """``python -m polysignal *args`` with ``env`` on top of a clean environment (no HOST,
    PORT, BACKEND, ... of the caller's); it must exit by itself."""
    base = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "PYTHONPATH")}
    return subprocess.run(
        [sys.executable, "-m", "polysignal", *args],
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=30 * UNIT,
    )


def assert_one_line(proc: subprocess.CompletedProcess[str], line: str) -> None:
    assert "Traceback" not in proc.stderr, proc.stderr
    assert (proc.returncode, proc.stderr) == (2, line + "\n")


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A free loopback port, then held by a listening socket of this test."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield int(sock.getsockname()[1])


def test_port_in_use(taken_port):
    proc = polysignal("serve", env={"HOST": "127.0.0.1", "PORT": str(taken_port)})
    assert_one_line(proc, f"polysignal: cannot listen: PORT {taken_port}: address already in use")


def test_port_in_use_with_workers(taken_port):
    """The parent finds out before it starts a worker (each would fail, be restarted and fail
    again)."""
    env = {
        "HOST": "127.0.0.1",
        "PORT": str(taken_port),
        "WORKERS": "2",
        "BACKEND": "redis://127.0.0.1:1/0",  # never reached: the port is checked first
    }
    proc = polysignal("serve", env=env)
    assert_one_line(proc, f"polysignal: cannot listen: PORT {taken_port}: address already in use")


def test_port_in_use_as_a_flag(taken_port):
    proc = polysignal("serve", "--host", "127.0.0.1", "--port", str(taken_port), env={})
    assert_one_line(proc, f"polysignal: cannot listen: PORT {taken_port}: address already in use")


def test_host_that_does_not_resolve():
    # The resolver's own reason is part of the line (a name that does not exist and a resolver
    # that cannot be reached call for different fixes); this machine's is asked the same way.
    with pytest.raises(socket.gaierror) as failed:
        socket.getaddrinfo("999.1.1.1", 80, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    proc = polysignal("serve", env={"HOST": "999.1.1.1", "PORT": str(free_port())})
    assert_one_line(
        proc,
        "polysignal: cannot listen: HOST 999.1.1.1: not an IP address or a name that resolves "
        f"({failed.value.strerror})",
    )


def test_host_that_is_not_this_machines():
    proc = polysignal("serve", env={"HOST": "192.0.2.1", "PORT": str(free_port())})  # TEST-NET-1
    assert_one_line(
        proc, "polysignal: cannot listen: HOST 192.0.2.1: not an address of this machine"
    )


@pytest.mark.parametrize(
    ("env", "line"),
    [
        (
            {"LOG_LEVEL": "verbose"},
            "LOG_LEVEL: expected DEBUG, INFO, WARNING or ERROR, got 'verbose'",
        ),
        ({"LOG_FORMAT": "xml"}, "LOG_FORMAT: expected text or json, got 'xml'"),
        (
            {"ACCESS_LOG": "sometimes"},
            "ACCESS_LOG: expected a boolean (1/0, true/false), got 'sometimes'",
        ),
        ({"BACKEND": "redis:/x"}, f"BACKEND: redis:/x is missing '//' after 'redis:' ({USAGE})"),
        (
            {"REDIS_URL": "redis:/x"},
            f"REDIS_URL: redis:/x is missing '//' after 'redis:' ({USAGE})",
        ),
        (
            {"BACKEND": "kafka://k:9092"},
            f"BACKEND: unsupported scheme 'kafka' in kafka://k:9092 ({USAGE})",
        ),
        ({"BACKEND": "redis:///0"}, "BACKEND: redis:///0 names no host (redis://host:port/db)"),
        (
            {"BACKEND": "redis://u:hunter2@h:63x9/0"},  # the password never shows
            "BACKEND: redis://u:***@h:63x9/0 is not a valid URL (Port could not be cast to "
            "integer value as '63x9')",
        ),
        (
            {"BACKEND": "rediss://h:99999/0"},
            "BACKEND: rediss://h:99999/0 is not a valid URL (Port out of range 0-65535)",
        ),
        ({"BACKEND": "redis://h:0/0"}, "BACKEND: redis://h:0/0: port 0 is not a Redis port"),
        (
            {"BACKEND": "redis://h:6379/one"},
            "BACKEND: redis://h:6379/one: database 'one' is not a number",
        ),
        ({"BACKEND": "redis://h?db=x"}, "BACKEND: redis://h?db=x: database 'x' is not a number"),
        ({"BACKEND": "unix://"}, "BACKEND: unix:// names no socket path (unix:///path/redis.sock)"),
        (
            {"BACKEND": "memory://x"},
            "BACKEND: memory://x: the memory backend takes nothing after memory://",
        ),
        (
            {"APP_SECRET": "s3cret"},
            f"APP_SECRET and APP_PASS: APP_SECRET is set but APP_PASS is not; {BOTH_SECRETS}",
        ),
        (
            {"APP_PASS": "pa55"},
            f"APP_SECRET and APP_PASS: APP_PASS is set but APP_SECRET is not; {BOTH_SECRETS}",
        ),
        (
            {"APP_FAILURE_WINDOW": "0"},
            "APP_FAILURE_WINDOW: must be more than 0 (or APP_MAX_FAILURES=0)",
        ),
    ],
    ids=lambda value: "-".join(value) if isinstance(value, dict) else "",
)
def test_configuration_errors(env, line):
    proc = polysignal("serve", env={"HOST": "127.0.0.1", "PORT": str(free_port()), **env})
    assert_one_line(proc, f"polysignal: configuration error: {line}")


def test_valid_backend_urls_are_accepted():
    """What the check lets through: the URL forms redis-py reads, with and without a port, a
    password, a database by path or by query, TLS, a Unix socket."""
    from polysignal.config import Settings

    for url in (
        "memory://",
        "redis://127.0.0.1",
        "redis://127.0.0.1:6379",
        "redis://u:p@redis.internal:6380/3",
        "rediss://h:6379/0?ssl_cert_reqs=none",
        "redis://h/?db=2",
        "unix:///run/redis.sock?db=1",
    ):
        assert Settings.from_env({"BACKEND": url}).server.backend_url == url


def test_serverless_local_without_boto3(tmp_path):
    """Without the ``serverless`` extra: a line saying what to install. boto3 is shadowed by a
    package that fails to import as a missing one does (``ModuleNotFoundError``)."""
    shadow = tmp_path / "boto3"
    shadow.mkdir()
    (shadow / "__init__.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'boto3'\", name='boto3')\n"
    )
    proc = polysignal(
        "serverless-local", "--port", str(free_port()), env={"PYTHONPATH": str(tmp_path)}
    )
    assert_one_line(
        proc,
        "polysignal: serverless-local needs boto3, which is not installed: "
        "pip install 'polysignal[serverless]'",
    )


def test_serverless_local_port_in_use(taken_port):
    proc = polysignal("serverless-local", "--port", str(taken_port), env={})
    assert_one_line(proc, f"polysignal: cannot listen: PORT {taken_port}: address already in use")


# --- ROOMS_DEV=1 stays on this machine unless HOST says otherwise -------------------------------


def start_node(env: dict[str, str]) -> tuple[subprocess.Popen[bytes], Path]:
    base = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "PYTHONPATH")}
    log = Path(tempfile.mkstemp(prefix="polysignal-dev-", suffix=".log")[1])
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "polysignal", "serve"],
            env={**base, "LOG_LEVEL": "INFO", **env},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    return proc, log


def wait_listening(proc: subprocess.Popen[bytes], log: Path) -> str:
    deadline = time.monotonic() + 20 * UNIT
    while "] listening on http://" not in log.read_text():
        assert proc.poll() is None, log.read_text()
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.05)
    return log.read_text()


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10 * UNIT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def connects(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=2 * UNIT).close()
    except OSError:
        return False
    return True


def test_rooms_dev_listens_on_loopback_only_without_host():
    port = free_port()
    proc, log = start_node({"ROOMS_DEV": "1", "PORT": str(port)})
    try:
        text = wait_listening(proc, log)
        assert (
            "[rooms] ROOMS_DEV=1: listening on 127.0.0.1 only; set HOST to listen elsewhere" in text
        )
        assert f"listening on http://127.0.0.1:{port} " in text
        assert connects("127.0.0.1", port)
        # Bound to 127.0.0.1 itself, not to every address: another loopback address is refused.
        assert not connects("127.0.0.2", port)
    finally:
        stop(proc)


def test_rooms_dev_with_an_explicit_host_listens_there_and_says_so():
    port = free_port()
    proc, log = start_node({"ROOMS_DEV": "1", "HOST": "127.0.0.2", "PORT": str(port)})
    try:
        text = wait_listening(proc, log)
        assert (
            "WARNING [rooms] ROOMS_DEV=1 with HOST=127.0.0.2 set explicitly: the development "
            "secrets are usable from every network that reaches it"
        ) in text
        assert f"listening on http://127.0.0.2:{port} " in text
        assert connects("127.0.0.2", port) and not connects("127.0.0.1", port)
    finally:
        stop(proc)
