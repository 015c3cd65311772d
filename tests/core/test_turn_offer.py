"""What a node hands out of TURN (core/turn.py, ``TurnOffer``): every answer of
``GET /turn-credentials`` and its preflight, whole, by origin, and the ICE servers of a
connection. The HTTP side is tests/server/test_turn_server.py's."""

from __future__ import annotations

import itertools

from polysignal.core.edge import AllowedOrigins
from polysignal.core.turn import (
    NOT_CONFIGURED,
    ORIGIN_REFUSED,
    HttpAnswer,
    TurnIssuer,
    TurnOffer,
    credentials_document,
)

URIS = ("turn:turn.example.com:3478?transport=udp",)
NOW = 1_700_000_000.75
STUN = {"urls": "stun:stun.example.com"}
ISSUER = TurnIssuer(("first-secret", "second-secret"), URIS, 600)
APP = "https://app.example"


def offer(
    issuer: TurnIssuer | None = ISSUER,
    origins: tuple[str, ...] = (APP,),
    base: tuple[dict[str, str], ...] | None = None,
) -> TurnOffer:
    counter = itertools.count(1)
    return TurnOffer(issuer, base, AllowedOrigins(origins), lambda: f"user-{next(counter)}")


def test_a_page_the_list_does_not_name_is_refused_without_cors():
    assert offer().refusal("https://evil.example") == HttpAnswer(
        403, (("Cache-Control", "no-store"),), (), ORIGIN_REFUSED
    )
    assert ORIGIN_REFUSED == "Forbidden: origin not allowed\n"
    assert offer(None).refusal("https://evil.example") == HttpAnswer(
        403, (("Cache-Control", "no-store"),), (), ORIGIN_REFUSED
    )


def test_without_turn_a_listed_page_hears_404_with_cors():
    assert offer(None).refusal(APP) == HttpAnswer(
        404,
        (("Access-Control-Allow-Origin", APP), ("Cache-Control", "no-store")),
        ("Origin",),
        NOT_CONFIGURED,
    )
    assert NOT_CONFIGURED == (
        "TURN is not configured on this server (it needs TURN_SECRET and TURN_URIS)\n"
    )
    assert offer(None).refusal(None) == HttpAnswer(
        404, (("Cache-Control", "no-store"),), ("Origin",), NOT_CONFIGURED
    )


def test_with_turn_an_allowed_request_is_served():
    assert offer().refusal(APP) is None
    assert offer().refusal(None) is None  # not a browser
    assert offer(origins=("*",)).refusal("https://any.example") is None


def test_the_credentials_answer_whole():
    answer = offer().credentials(APP, "alice", NOW)
    expected = credentials_document(ISSUER.issue("alice", NOW))
    assert answer == HttpAnswer(
        200,
        (("Access-Control-Allow-Origin", APP), ("Cache-Control", "no-store")),
        ("Origin",),
        None,
        expected,
    )
    assert expected["username"] == "1700000600:alice"


def test_an_anonymous_request_gets_a_fresh_user_each_time():
    anonymous = offer()
    first = anonymous.credentials(None, None, NOW)
    second = anonymous.credentials(None, None, NOW)
    assert first.document is not None and second.document is not None
    assert first.document["username"] == "1700000600:user-1"
    assert second.document["username"] == "1700000600:user-2"
    assert first.headers == (("Cache-Control", "no-store"),)


def test_whom_a_credential_is_for():
    users = offer()
    assert users.user("alice") == "alice"
    assert users.user(None) == "user-1"
    assert users.user("") == "user-2"  # an empty user is no user


def test_cors_echoes_an_allowed_origin_only():
    listed = offer(origins=(APP,))
    assert listed.cors(APP) == (("Access-Control-Allow-Origin", APP), ("Cache-Control", "no-store"))
    assert listed.cors("HTTPS://APP.EXAMPLE") == (
        ("Access-Control-Allow-Origin", "HTTPS://APP.EXAMPLE"),
        ("Cache-Control", "no-store"),
    )
    assert listed.cors("https://evil.example") == (("Cache-Control", "no-store"),)
    assert listed.cors(None) == (("Cache-Control", "no-store"),)
    assert listed.cors("") == (("Cache-Control", "no-store"),)
    anyone = offer(origins=("*",))
    assert anyone.cors("https://any.example") == (
        ("Access-Control-Allow-Origin", "https://any.example"),
        ("Cache-Control", "no-store"),
    )


def test_the_preflight_whole():
    assert offer().preflight(APP, "authorization") == HttpAnswer(
        204,
        (
            ("Access-Control-Allow-Methods", "GET"),
            ("Access-Control-Allow-Headers", "authorization"),
            ("Access-Control-Allow-Origin", APP),
            ("Cache-Control", "no-store"),
        ),
        ("Access-Control-Request-Headers", "Origin"),
    )
    for asked in (None, ""):
        assert offer().preflight(APP, asked) == HttpAnswer(
            204,
            (
                ("Access-Control-Allow-Methods", "GET"),
                ("Access-Control-Allow-Origin", APP),
                ("Cache-Control", "no-store"),
            ),
            ("Origin",),
        )
    assert offer().preflight("https://evil.example", None) == HttpAnswer(
        204, (("Access-Control-Allow-Methods", "GET"), ("Cache-Control", "no-store")), ("Origin",)
    )


def test_ice_servers_of_a_connection():
    with_base = offer(base=(STUN,))
    entry = ISSUER.issue("bob", NOW).ice_server()
    assert with_base.ice_servers("bob", NOW) == (STUN, entry)
    (anonymous,) = offer().ice_servers(None, NOW)
    assert anonymous["username"] == "1700000600:user-1"
