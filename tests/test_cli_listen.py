"""How ``polysignal serve`` names a listening address it cannot take (cli.py), for the errors a
test cannot provoke on demand (a port taken between the check and the bind, a privileged
port for root)."""

from __future__ import annotations

import errno
import socket

import pytest

from polysignal.cli import check_listen, listen_error


@pytest.mark.parametrize(
    ("exc", "line"),
    [
        (OSError(errno.EADDRINUSE, "Address in use"), "PORT 4444: address already in use"),
        (
            OSError(errno.EACCES, "Permission denied"),
            "PORT 4444: permission denied (ports below 1024 need privileges)",
        ),
        (
            OSError(errno.EADDRNOTAVAIL, "Cannot assign"),
            "HOST h: not an address of this machine",
        ),
        (
            socket.gaierror(socket.EAI_NONAME, "Name or service not known"),
            "HOST h: not an IP address or a name that resolves (Name or service not known)",
        ),
    ],
)
def test_each_bind_error_names_its_setting(exc, line):
    assert listen_error("h", 4444, exc) == line


def test_other_errors_are_not_taken_for_a_setting():
    assert listen_error("h", 4444, OSError(errno.EMFILE, "Too many open files")) is None


def test_port_0_and_a_free_port_pass_the_check():
    assert check_listen("127.0.0.1", 0) is None
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    assert check_listen("127.0.0.1", port) is None
    assert check_listen("127.0.0.1", port, reuse_port=True) is None
