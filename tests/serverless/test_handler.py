"""The Lambda handler with API Gateway-shaped events, against moto's DynamoDB (server mode) and a
recording Management API on loopback."""

from __future__ import annotations

import time

import pytest

import polysignal.serverless
from polysignal.serverless.sender import management_endpoint
from polysignal.serverless.store import TTL_ATTRIBUTE
from serverless.awslocal import ws_event

pytestmark = pytest.mark.timeout(60)


def by_connection(items):
    """{connectionId: {topic: item}} from raw table items."""
    out: dict[str, dict[str, dict]] = {}
    for item in items:
        cid = item["sk"]["S"].removeprefix("CONNECTION-")
        out.setdefault(cid, {})[item["pk"]["S"].removeprefix("TOPIC-")] = item
    return out


def test_subscribe_writes_pk_sk_data_and_ttl(clients, items, handler):
    """One item per topic with the original's keys, `data` written (so gs1 sees it), and a TTL."""
    (a,) = clients(1)
    before = int(time.time())
    a.subscribe("room-1", "room 2/ü:x")
    rows = by_connection(items())[a.id]
    assert set(rows) == {"room-1", "room 2/ü:x"}
    for topic, item in rows.items():
        assert item["pk"] == {"S": f"TOPIC-{topic}"}
        assert item["sk"] == {"S": f"CONNECTION-{a.id}"}
        assert item["data"] == {"S": topic}
        expires = int(item[TTL_ATTRIBUTE]["N"])
        ttl = handler.settings.subscription_ttl
        assert before + ttl <= expires <= int(time.time()) + ttl
    assert a.frames() == []  # subscribe has no reply


def test_publish_reaches_the_other_subscribers_with_clients_and_origin(clients, handler):
    """Flow-Like semantics: every other subscriber once, extra fields kept, no echo."""
    a, b, c, outsider = clients(4)
    for peer in (a, b, c):
        peer.subscribe("sync-room")
    outsider.subscribe("elsewhere")
    message = {"type": "publish", "topic": "sync-room", "data": {"x": 1}, "messageId": "m-1"}
    assert a.send(message) == {
        "statusCode": 200,
        "headers": {"Content-Type": "text/plain", "Access-Control-Allow-Origin": "*"},
        "body": "ok",
    }
    expected = {**message, "clients": 3, "_origin": handler.settings.origin}
    assert b.frames() == [expected]
    assert c.frames() == [expected]
    assert a.frames() == []
    assert outsider.frames() == []


def test_client_cannot_forge_clients_or_origin(clients, handler):
    a, b = clients(2)
    b.subscribe("t")
    a.send({"type": "publish", "topic": "t", "data": 1, "clients": 99, "_origin": "forged"})
    (got,) = b.frames()
    assert got["clients"] == 1 and got["_origin"] == handler.settings.origin


def test_origin_is_the_function_name_in_lambda(make_handler, management):
    handler = make_handler(AWS_LAMBDA_FUNCTION_NAME="stack-SignalingFunction-x1")
    handler(ws_event("$default", "b", '{"type":"subscribe","topics":["t"]}'))
    handler(ws_event("$default", "a", '{"type":"publish","topic":"t","data":1}'))
    assert management.frames("b")[0]["_origin"] == "stack-SignalingFunction-x1"


def test_echo_option_delivers_to_the_sender_too(make_handler, management):
    handler = make_handler(ECHO="1")
    for cid in ("a", "b"):
        handler(ws_event("$default", cid, '{"type":"subscribe","topics":["t"]}'))
    handler(ws_event("$default", "a", '{"type":"publish","topic":"t","data":"x"}'))
    assert [f["clients"] for f in management.frames("a")] == [2]
    assert [f["data"] for f in management.frames("b")] == ["x"]


def test_publisher_need_not_be_subscribed(clients):
    a, b = clients(2)
    b.subscribe("t")
    a.send({"type": "publish", "topic": "t", "data": "x"})
    assert [f["data"] for f in b.frames()] == ["x"]
    assert b.frames()[0]["clients"] == 1


def test_publish_to_a_topic_nobody_holds_sends_nothing(clients, management):
    (a,) = clients(1)
    assert a.send({"type": "publish", "topic": "empty", "data": 1})["statusCode"] == 200
    assert management.recipients() == []


def test_unsubscribe_stops_delivery_and_deletes_the_item(clients, items):
    a, b = clients(2)
    b.subscribe("t", "u")
    b.send({"type": "unsubscribe", "topics": ["t", "never-held"]})
    assert set(by_connection(items())[b.id]) == {"u"}
    a.send({"type": "publish", "topic": "t", "data": 1})
    assert b.frames() == []
    a.send({"type": "publish", "topic": "u", "data": 2})
    assert [f["data"] for f in b.frames()] == [2]


def test_duplicate_topics_are_one_subscription(clients, items):
    a, b = clients(2)
    b.subscribe("t", "t", "t")
    b.subscribe("t")
    assert len(items()) == 1
    a.send({"type": "publish", "topic": "t", "data": 1})
    assert b.frames()[0]["clients"] == 1


def test_ping_is_answered_pong(clients):
    (a,) = clients(1)
    a.send({"type": "ping"})
    assert a.frames() == [{"type": "pong"}]


def test_disconnect_removes_every_subscription_through_the_gsi(clients, items):
    """60 topics (three batches of deletes) found via gs1; other connections untouched."""
    a, b = clients(2)
    topics = [f"topic-{i}" for i in range(60)]
    a.subscribe(*topics)
    b.subscribe("topic-0", "topic-59")
    assert len(by_connection(items())[a.id]) == 60
    assert a.disconnect()["statusCode"] == 200
    remaining = by_connection(items())
    assert a.id not in remaining
    assert set(remaining[b.id]) == {"topic-0", "topic-59"}


def test_a_connection_answered_410_is_cleaned_up(clients, management, items):
    """The stale peer loses all its subscriptions; the fan-out still reaches the others."""
    a, b, stale, c = clients(4)
    for peer in (b, stale, c):
        peer.subscribe("t")
    stale.subscribe("other-1", "other-2")
    management.gone.add(stale.id)
    assert a.send({"type": "publish", "topic": "t", "data": 1})["statusCode"] == 200
    assert [f["data"] for f in b.frames()] == [1]
    assert [f["data"] for f in c.frames()] == [1]
    assert stale.id not in by_connection(items())
    management.clear()
    a.send({"type": "publish", "topic": "t", "data": 2})
    assert stale.id not in management.attempts
    assert b.frames()[0]["clients"] == 2


def test_a_sender_gone_before_its_pong_is_cleaned_up(clients, management, items):
    (a,) = clients(1)
    a.subscribe("t")
    management.gone.add(a.id)
    assert a.send({"type": "ping"})["statusCode"] == 200
    assert items() == []


def test_other_post_errors_are_logged_and_not_fatal(clients, management, items, caplog):
    a, b, broken, c = clients(4)
    for peer in (b, broken, c):
        peer.subscribe("t")
    management.failing.add(broken.id)
    assert a.send({"type": "publish", "topic": "t", "data": 1})["statusCode"] == 200
    assert [f["data"] for f in b.frames()] == [1]
    assert [f["data"] for f in c.frames()] == [1]
    # Not a 410: the subscription stays, and the failure is logged.
    assert broken.id in by_connection(items())
    assert any("403" in r.getMessage() for r in caplog.records)


def test_publish_to_100_subscribers_reaches_all_of_them(clients, management):
    peers = clients(101)
    publisher, subscribers = peers[0], peers[1:]
    for peer in subscribers:
        peer.subscribe("crowd")
    publisher.send({"type": "publish", "topic": "crowd", "data": "all"})
    assert sorted(management.recipients()) == sorted(p.id for p in subscribers)
    for peer in subscribers:
        (got,) = peer.frames()
        assert got["data"] == "all" and got["clients"] == 100


def test_ttl_is_refreshed_by_activity_and_expired_subscriptions_are_not_served(
    clients, handler, items
):
    """Activity moves the TTL forward once it is older than SUBSCRIPTION_REFRESH."""
    a, b = clients(2)
    ttl, refresh = handler.settings.subscription_ttl, handler.settings.subscription_refresh
    start = time.time()
    handler.clock = lambda: start
    b.subscribe("t")

    def expires() -> int:
        return int(by_connection(items())[b.id]["t"][TTL_ATTRIBUTE]["N"])

    assert expires() == int(start) + ttl
    handler.clock = lambda: start + refresh - 5  # activity before the refresh is due
    b.send({"type": "ping"})
    assert expires() == int(start) + ttl
    later = start + refresh + 5  # due: any message refreshes
    handler.clock = lambda: later
    b.send({"type": "ping"})
    assert expires() == int(later) + ttl
    # Past the TTL without activity: not counted, not delivered (DynamoDB deletes lazily).
    handler.clock = lambda: later + ttl + 1
    a.send({"type": "publish", "topic": "t", "data": 1})
    assert b.frames() == [{"type": "pong"}, {"type": "pong"}]


@pytest.mark.parametrize(
    ("body", "error"),
    [
        ("not json", "invalid JSON"),
        ("[1,2]", "expected a JSON object, got a list"),
        ("{}", "missing 'type'"),
        ('{"type":7}', "'type' must be a string, got a number"),
        ('{"type":"dance"}', "unknown type 'dance'"),
        ('{"type":"subscribe","topics":"t"}', "subscribe: 'topics' must be a list, got a string"),
        ('{"type":"subscribe"}', "subscribe: missing 'topics'"),
        ('{"type":"publish","data":1}', "publish: missing 'topic'"),
        ('{"type":"publish","topic":5}', "publish: 'topic' must be a string, got a number"),
        ('{"type":"publish","topic":"' + "x" * 513 + '"}', "publish: topic longer than 512"),
        ('{"type":"ping","x":NaN}', "invalid JSON"),
        ('{"type":"ping","x":"\ud800"}', "invalid JSON"),  # a lone surrogate in the text
        ('{"type":"ping","x":"\\ud800"}', "invalid JSON"),  # ... or as a JSON escape
        ("", "invalid JSON"),
        (None, "invalid JSON"),
        (
            '{"type":"publish","topic":"t","data":' + "[" * 300 + "]" * 300 + "}",
            "JSON nested deeper than 64 levels",
        ),
    ],
)
def test_bad_input_gets_an_error_frame(handler, management, body, error):
    """Answered with the topics protocol's error frame and HTTP 200, never a silent 500."""
    result = handler(ws_event("$default", "bad", body))
    assert result["statusCode"] == 200
    (frame,) = management.frames("bad")
    assert frame["type"] == "error"
    assert frame["message"].startswith(error)


def test_binary_frames_get_an_error_frame(clients):
    (a,) = clients(1)
    assert a.send(b"\x00\x01binary")["statusCode"] == 200
    assert a.frames() == [
        {"type": "error", "message": "binary frames are not supported; send JSON text"}
    ]


def test_oversize_messages_get_an_error_frame(make_handler, management, items):
    handler = make_handler(MAX_FRAME_BYTES="2048")
    body = '{"type":"subscribe","topics":["' + "x" * 3000 + '"]}'
    assert handler(ws_event("$default", "big", body))["statusCode"] == 200
    (frame,) = management.frames("big")
    assert frame["message"] == f"message too large ({len(body)} bytes; the limit is 2048)"
    assert items() == []


def test_bad_entries_are_skipped_and_reported_the_rest_subscribed(clients, items):
    (b,) = clients(1)
    b.send({"type": "subscribe", "topics": ["ok", 5, "", None, "x" * 600, "fine"]})
    assert set(by_connection(items())[b.id]) == {"ok", "fine"}
    (frame,) = b.frames()
    assert frame["type"] == "error"
    assert frame["message"].startswith("subscribe: skipped topics[1] is a number")
    assert "topics[4] is longer than 512 characters" in frame["message"]


def test_topics_over_the_dynamodb_key_limit_are_refused(make_handler, management, items):
    """`data` is gs1's range key (1024 bytes at most): longer topics get an error frame."""
    handler = make_handler(MAX_TOPIC_LENGTH="2000")
    long_topic = "ü" * 600  # 1200 UTF-8 bytes
    handler(ws_event("$default", "c", '{"type":"subscribe","topics":["' + long_topic + '","t"]}'))
    assert [i["data"]["S"] for i in items()] == ["t"]
    assert "longer than 1024 UTF-8 bytes" in management.frames("c")[0]["message"]
    handler(ws_event("$default", "c", '{"type":"publish","topic":"' + long_topic + '"}'))
    assert "longer than 1024 UTF-8 bytes" in management.frames("c")[1]["message"]


def test_topics_per_connection_limit(make_handler, management, items):
    handler = make_handler(MAX_TOPICS_PER_CONNECTION="3")
    handler(ws_event("$default", "c", '{"type":"subscribe","topics":["a","b"]}'))
    handler(ws_event("$default", "c", '{"type":"subscribe","topics":["b","c","d","e"]}'))
    assert sorted(i["data"]["S"] for i in items()) == ["a", "b", "c"]
    (frame,) = management.frames("c")
    assert frame["message"] == (
        "subscribe: 2 topic(s) refused, a connection may hold at most 3 topics"
    )


@pytest.mark.parametrize(
    "event",
    [
        {},
        {"requestContext": {"routeKey": "$default"}},
        {"requestContext": {"routeKey": "$default", "connectionId": ""}},
        {"requestContext": "nope"},
        [],
        None,
    ],
)
def test_events_without_a_connection_id_are_400(handler, management, event):
    assert handler(event) == {
        "statusCode": 400,
        "headers": {"Content-Type": "text/plain", "Access-Control-Allow-Origin": "*"},
        "body": "Missing connectionId",
    }
    assert management.recipients() == []


def test_unknown_route_is_400(handler):
    result = handler(ws_event("sendmessage", "c", '{"type":"ping"}'))
    assert result["statusCode"] == 400 and "unknown route" in result["body"]


def test_a_storage_failure_is_500_with_an_error_frame(make_handler, management, caplog):
    """A table that does not exist: logged with a traceback, the client hears `internal error`."""
    handler = make_handler(TABLE_NAME="missing-table")
    result = handler(ws_event("$default", "c", '{"type":"subscribe","topics":["t"]}'))
    assert result["statusCode"] == 500 and result["body"] == "internal error"
    assert management.frames("c") == [{"type": "error", "message": "internal error"}]
    assert any(r.levelname == "ERROR" and r.exc_info for r in caplog.records)
    assert handler(ws_event("$disconnect", "c"))["statusCode"] == 500


def test_table_name_is_honoured_everywhere(clients, dynamodb, table):
    """Only the configured table exists and is used (the original's queries read 'Database')."""
    a, b = clients(2)
    b.subscribe("t")
    a.send({"type": "publish", "topic": "t", "data": 1})
    b.disconnect()
    assert "Database" not in dynamodb.list_tables()["TableNames"]
    assert b.frames()[0]["data"] == 1


def test_module_entry_point_reads_the_environment(lambda_env, management, monkeypatch, items):
    """`polysignal.serverless.handler` (what template.yaml names) configures itself from env."""
    for key, value in lambda_env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(polysignal.serverless, "_handler", None)
    entry = polysignal.serverless.handler
    assert entry(ws_event("$connect", "x"), None)["statusCode"] == 200
    entry(ws_event("$default", "x", '{"type":"subscribe","topics":["t"]}'), None)
    entry(ws_event("$default", "y", '{"type":"publish","topic":"t","data":1}'), None)
    assert management.frames("x")[0]["data"] == 1
    entry(ws_event("$disconnect", "x"), None)
    assert items() == []
    handler = polysignal.serverless._handler
    assert handler is not None
    handler.close()


def test_management_endpoint_comes_from_the_event():
    context = ws_event("$default", "c")["requestContext"]
    assert (
        management_endpoint(context, "eu-west-1")
        == "https://abc123.execute-api.eu-west-1.amazonaws.com/test"
    )
    assert management_endpoint({"apiId": "abc123"}, "eu-west-1") is None
