"""Log lines as an operator reads them (docs/operations.md, "Logs"): the text and JSON formats,
the connection's fields, the access log, lines held back per interval."""

from __future__ import annotations

import io
import json
import logging
import re
import signal
import sys
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest

from polysignal import logs
from polysignal.logs import JsonFormatter, TextFormatter, Throttle

from support import NodeProcess, receive_json

pytestmark = pytest.mark.timeout(90)

TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
CREATED = 1796153420.123456  # 2026-12-01T19:30:20.123456Z


def record(msg: str = "hello", level: int = logging.INFO, **extra: Any) -> logging.LogRecord:
    made = logging.LogRecord("polysignal.topics", level, __file__, 1, msg, (), None)
    made.created = CREATED
    made.msecs = 123.456
    made.__dict__.update(extra)
    return made


CONTEXT = {"conn_id": 12, "protocol": "topics", "remote": "127.0.0.1", "peer_id": "abc"}


# --- the two formats ----------------------------------------------------------------------------


def test_text_line_has_utc_milliseconds_tag_and_the_connection_fields():
    line = TextFormatter().format(record(**CONTEXT))
    assert line == (
        "2026-12-01T19:30:20.123Z INFO    [topics] hello conn=12 proto=topics remote=127.0.0.1 "
        "peer=abc"
    )


def test_text_line_shows_only_the_fields_a_record_has():
    assert (
        TextFormatter().format(record("plain")) == "2026-12-01T19:30:20.123Z INFO    [topics] plain"
    )
    without_peer = record("x", **{**CONTEXT, "peer_id": None})
    assert (
        TextFormatter()
        .format(without_peer)
        .endswith("[topics] x conn=12 proto=topics remote=127.0.0.1")
    )


def test_text_line_quotes_a_client_chosen_value_so_it_cannot_forge_a_line():
    forged = 'a b\n2026-12-01T00:00:00.000Z ERROR   [server] "x=1"'
    line = TextFormatter().format(record("id claimed", **{**CONTEXT, "peer_id": forged}))
    assert "\n" not in line
    assert line.endswith(' peer="a b\\n2026-12-01T00:00:00.000Z ERROR   [server] \\"x=1\\""'), line


def test_json_line_parses_and_carries_every_field():
    line = JsonFormatter().format(record("hello", logging.WARNING, **CONTEXT))
    assert json.loads(line) == {
        "time": "2026-12-01T19:30:20.123Z",
        "level": "WARNING",
        "logger": "topics",
        "message": "hello",
        "conn_id": 12,
        "protocol": "topics",
        "remote": "127.0.0.1",
        "peer_id": "abc",
    }
    line = JsonFormatter().format(record("no context"))
    assert json.loads(line) == {
        "time": "2026-12-01T19:30:20.123Z",
        "level": "INFO",
        "logger": "topics",
        "message": "no context",
    }


def test_json_exception_is_one_field_on_one_line():
    try:
        raise ValueError("boom\nsecond line")
    except ValueError:
        failed = record("handler failed", logging.ERROR, exc_info=sys.exc_info(), **CONTEXT)
    line = JsonFormatter().format(failed)
    assert "\n" not in line
    data = json.loads(line)
    assert data["message"] == "handler failed" and data["conn_id"] == 12
    trace = data["traceback"]
    assert trace.startswith("Traceback (most recent call last):\n")
    assert trace.endswith("ValueError: boom\nsecond line")
    assert "exc_info" not in data


@pytest.fixture
def logging_state() -> Iterator[None]:
    """Restores what ``logs.configure`` changes, so the other tests log as before."""
    root, ours = logging.getLogger(), logging.getLogger("polysignal")
    saved = (root.handlers[:], root.level, ours.handlers[:], ours.level, ours.propagate)
    access = logs.access_log.level
    try:
        yield
    finally:
        root.handlers[:], root.level, ours.handlers[:], ours.level, ours.propagate = (
            saved[0],
            saved[1],
            saved[2],
            saved[3],
            saved[4],
        )
        logs.access_log.setLevel(access)


def test_configure_gives_every_logger_of_the_process_one_format(logging_state):
    out = io.StringIO()
    logs.configure("INFO", "json", stream=out)
    logging.getLogger("polysignal.redis").debug("not at INFO")
    logging.getLogger("polysignal.redis").info("connected", extra={"remote": "127.0.0.1"})
    logging.getLogger("aiohttp.server").info("a library's INFO stays out")
    logging.getLogger("aiohttp.server").warning("a library's warning")
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    for line in lines:
        assert TIME.match(line.pop("time")), line
    assert lines == [
        {"level": "INFO", "logger": "redis", "message": "connected", "remote": "127.0.0.1"},
        {"level": "WARNING", "logger": "aiohttp.server", "message": "a library's warning"},
    ]


# --- lines held back per interval ----------------------------------------------------------------


def test_throttle_lets_one_line_per_interval_and_counts_the_rest():
    now = [0.0]
    throttle = Throttle(10.0, clock=lambda: now[0])
    assert throttle.allow("k") == 0
    assert [throttle.allow("k") for _ in range(3)] == [None, None, None]
    assert throttle.allow("other") == 0
    now[0] = 9.999
    assert throttle.allow("k") is None
    now[0] = 10.0
    assert throttle.allow("k") == 4  # "(4 more like it)"
    assert throttle.allow("k") is None


def test_throttle_with_a_burst_lets_that_many_through_per_interval():
    now = [0.0]
    throttle = Throttle(10.0, clock=lambda: now[0], burst=3)
    assert [throttle.allow("k") for _ in range(5)] == [0, 0, 0, None, None]
    now[0] = 10.0
    assert [throttle.allow("k") for _ in range(4)] == [2, 0, 0, None]
    assert logs.more(2) == " (2 more like it)" and logs.more(0) == ""


# --- a real node ---------------------------------------------------------------------------------


async def node_traffic(node: NodeProcess) -> None:
    """A topics WebSocket, plain HTTP (a probe, a path with a query, a wrong password)."""
    async with aiohttp.ClientSession() as http:
        ws = await http.ws_connect(node.ws_url + "/")
        await ws.send_str('{"type":"ping"}')
        assert await receive_json(ws) == {"type": "pong"}
        await ws.close()
        async with http.get(node.url + "/healthz") as resp:
            assert await resp.text() == "okay"
        async with http.get(node.url + "/nothing?sid=SECRET-SID&t=1") as resp:
            assert await resp.text() == "okay"
        async with http.post(node.url + "/app", data={"app": "a", "password": "wrong"}) as resp:
            assert resp.status == 401


def stopped_log(node: NodeProcess) -> str:
    assert node.stop(signal.SIGTERM) == 0
    return node.log()


ROOMS = {"APP_SECRET": "s3cret", "APP_PASS": "pa55"}


async def test_json_lines_of_a_running_node_parse_and_carry_their_fields():
    node = NodeProcess({"LOG_FORMAT": "json", **ROOMS}).start()
    try:
        await node_traffic(node)
    finally:
        text = stopped_log(node)
    lines = [json.loads(line) for line in text.splitlines()]  # every line is one JSON object
    for line in lines:
        assert TIME.match(line["time"]) and line["level"] in ("INFO", "WARNING"), line
        assert isinstance(line["logger"], str) and isinstance(line["message"], str), line
    assert "SECRET-SID" not in text  # the query of a path is never logged
    access = [line for line in lines if line["logger"] == "access"]
    assert [(a["method"], a["path"], a["status"]) for a in access] == [
        ("GET", "/nothing", 200),
        ("POST", "/app", 401),
    ], "probes (/healthz, /readyz) are DEBUG; every other request is INFO"
    for line in access:
        assert line["remote"] == "127.0.0.1"
        assert isinstance(line["bytes"], int) and line["bytes"] > 0
        assert isinstance(line["duration_ms"], float) and line["duration_ms"] >= 0
        assert line["message"] == (
            f"{line['method']} {line['path']} {line['status']} {line['bytes']} bytes "
            f"{line['duration_ms']:.1f} ms"
        )
    (wrong,) = [line for line in lines if "wrong password" in line["message"]]
    assert (wrong["level"], wrong["logger"], wrong["remote"]) == ("WARNING", "rooms", "127.0.0.1")
    # The topics connection's opening and closing lines carry its context.
    topics = [line for line in lines if line.get("protocol") == "topics"]
    assert len(topics) >= 2, lines
    for line in topics:
        assert isinstance(line["conn_id"], int) and line["remote"] == "127.0.0.1"
        assert "peer_id" in line
    assert len({line["conn_id"] for line in topics}) == 1


ACCESS_TEXT = re.compile(
    r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z INFO    \[access\] "
    r"(GET /nothing 200|POST /app 401) \d+ bytes \d+\.\d ms remote=127\.0\.0\.1$",
    re.MULTILINE,
)


async def test_access_log_in_text_is_on_by_default_and_off_with_access_log_0():
    node = NodeProcess(ROOMS).start()
    try:
        await node_traffic(node)
    finally:
        text = stopped_log(node)
    assert ACCESS_TEXT.findall(text) == ["GET /nothing 200", "POST /app 401"], text
    assert "SECRET-SID" not in text and "/healthz" not in text

    quiet = NodeProcess({"ACCESS_LOG": "0", **ROOMS}).start()
    try:
        await node_traffic(quiet)
    finally:
        text = stopped_log(quiet)
    assert "[access]" not in text
    assert "wrong password" in text  # the rest of the log is there


async def test_probes_are_in_the_access_log_at_debug():
    node = NodeProcess({"LOG_LEVEL": "DEBUG"}).start()
    try:
        async with aiohttp.ClientSession() as http, http.get(node.url + "/healthz") as resp:
            assert resp.status == 200
    finally:
        text = stopped_log(node)
    assert re.search(
        r"Z DEBUG   \[access\] GET /healthz 200 \d+ bytes \d+\.\d ms remote=127\.0\.0\.1$",
        text,
        re.MULTILINE,
    ), text


async def test_the_access_logger_is_quiet_until_the_process_configures_logging(caplog):
    """An application embedding the server (as this suite does) gets no line per request
    unless it configures logging with ``logs.configure``."""
    from support import running_server

    caplog.set_level(logging.DEBUG)
    async with running_server() as srv, srv.session.get(srv.url + "/nothing") as resp:
        assert resp.status == 200
    assert not [r for r in caplog.records if r.name == "polysignal.access"]


def test_the_access_log_names_the_client_behind_a_trusted_proxy(caplog):
    """The front door puts the client's address on a forwarded request (``CLIENT_KEY``); aiohttp's
    access logger sees that request, not the handler's clone, and logs the client."""
    from aiohttp import web
    from aiohttp.test_utils import make_mocked_request

    from polysignal.logs import CLIENT_KEY, AccessLogger

    caplog.set_level(logging.INFO, logger="polysignal.access")
    access = AccessLogger(logging.getLogger("polysignal.access"), "")
    forwarded = make_mocked_request("GET", "/app?token=secret")
    forwarded[CLIENT_KEY] = "203.0.113.7"
    access.log(forwarded, web.Response(status=200), 0.0012)
    direct = make_mocked_request("GET", "/x")
    access.log(direct, web.Response(status=404), 0.0)
    remotes = [r.remote for r in caplog.records if r.name == "polysignal.access"]  # type: ignore[attr-defined]
    assert remotes == ["203.0.113.7", direct.remote]


@pytest.mark.parametrize(
    ("path", "shown"),
    [
        ("/token/eyJ.secret.sig/introduction/alice", "/token/***/introduction/alice"),
        ("/token/eyJ.secret.sig", "/token/***"),
        ("/tokens/x", "/tokens/x"),
    ],
)
def test_the_access_log_hides_a_token_path_prefix(caplog, path, shown):
    from aiohttp import web
    from aiohttp.test_utils import make_mocked_request

    from polysignal.logs import AccessLogger

    caplog.set_level(logging.INFO, logger="polysignal.access")
    access = AccessLogger(logging.getLogger("polysignal.access"), "")
    access.log(make_mocked_request("GET", path + "?token=t"), web.Response(status=101), 0.001)
    paths = [r.path for r in caplog.records if r.name == "polysignal.access"]  # type: ignore[attr-defined]
    assert paths == [shown]
