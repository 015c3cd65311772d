"""What Signal-Fire's machine makes of the cluster's failures (core/signalfire.py): a look up or
a send that failed is reported (``Fault``) and answered as if it had found nobody; and which
upgrades are Signal-Fire's (``serves``)."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from polysignal.core.effects import Send, ToNode
from polysignal.core.errors import BackendUnavailable
from polysignal.core.signalfire import (
    RELAY_KIND,
    UNDELIVERABLE_KIND,
    Claim,
    Fault,
    Lookup,
    SignalFireNode,
    serves,
)
from polysignal.protocols import signalfire as proto

A = "A" * 21  # the id of the local peer
B = "B" * 21  # the id of a peer on another node


class Conn:
    """A connection handle as the hub would pass one: it may be closing."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.closing = False


def joined() -> tuple[SignalFireNode, Conn]:
    """A machine with a peer welcomed as ``A...``."""
    m = SignalFireNode("node-1", is_closing=lambda conn: conn.closing, new_id=iter([A]).__next__)
    conn = Conn("a")
    (claim,) = m.on_open(conn, False)
    assert claim == Claim(conn, A)
    m.on_claimed(claim, True)
    return m, conn


def error(conn: Conn, message: str) -> Send:
    return Send(conn, orjson.dumps({"id": "r1", "ok": False, "data": {"message": message}}))


def offer(m: SignalFireNode, conn: Conn) -> Lookup:
    data = {"offer": {"type": "offer", "sdp": "v=0"}}
    frame = orjson.dumps({"id": "r1", "cmd": "offer", "target": B, "data": data})
    (lookup,) = m.on_message(conn, frame, 0.0)
    assert isinstance(lookup, Lookup)
    return lookup


def relay_of(m: SignalFireNode, conn: Conn) -> ToNode:
    _, relay = m.on_lookup(offer(m, conn), "node-2", 0.0)
    assert isinstance(relay, ToNode) and relay.kind == RELAY_KIND
    return relay


@pytest.mark.parametrize("failure", [BackendUnavailable("away"), RuntimeError("bug")])
def test_a_look_up_that_fails_is_reported_and_answered_internal_error(failure):
    m, a = joined()
    assert m.on_lookup_error(offer(m, a), failure) == (
        Fault("lookup", f"cannot look up {B}", failure),
        error(a, "Internal Server Error"),
    )


def test_a_notices_look_up_that_fails_is_only_reported():
    m, _ = joined()
    failure = BackendUnavailable("away")
    notice = Lookup(B, notice=proto.notice(proto.Cmd.SESSION_TIMEOUT, A))
    assert m.on_lookup_error(notice, failure) == (Fault("lookup", f"cannot look up {B}", failure),)


@pytest.mark.parametrize("failure", [BackendUnavailable("away"), RuntimeError("bug")])
def test_a_relay_that_could_not_be_sent_is_reported_and_peer_offline(failure):
    m, a = joined()
    assert m.on_send_error(relay_of(m, a), failure) == (
        Fault("send", "cannot send signalfire to node node-2", failure),
        error(a, "Peer Offline"),
    )


def test_a_notice_back_that_could_not_be_sent_is_only_reported():
    m, _ = joined()
    failure = BackendUnavailable("away")
    back = ToNode("node-2", UNDELIVERABLE_KIND, b"{}")
    assert m.on_send_error(back, failure) == (
        Fault("send", "cannot send signalfire-undeliverable to node node-2", failure),
    )


@pytest.mark.parametrize(
    ("path", "offered", "served"),
    [
        ("/signal-fire", (), True),
        ("/signal-fire", ("chat",), True),
        ("/", ("Signal-Fire@3",), True),
        ("/any/path", ("chat", "Signal-Fire@2"), True),
        ("/", (), False),
        ("/", ("chat", "signal-fire@3"), False),  # subprotocols are case-sensitive
        ("/signal-fire/", (), False),
    ],
)
def test_which_upgrades_are_signal_fire(path: str, offered: Any, served: bool):
    assert serves(path, offered, "/signal-fire") is served
