"""TURN credentials in coturn's ``use-auth-secret`` scheme, on their own (core/turn.py). Against
a real coturn: tests/turn/."""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Callable

import orjson
import pytest

from polysignal.core.effects import Send
from polysignal.core.signalfire import Claim, SignalFireNode
from polysignal.core.turn import (
    MAX_USERNAME_BYTES,
    TurnCredential,
    TurnIssuer,
    credentials_document,
    escape_user,
    expiry,
    ice_servers,
    password,
    username,
)

URIS = ("turn:turn.example.com:3478?transport=udp", "turns:turn.example.com:5349")
NOW = 1_700_000_000
TTL = 86_400

# Computed outside Python, with the TURN REST API's recipe:
#   printf '%s' '1700086400:alice' | openssl dgst -sha1 -hmac first-secret -binary | base64
FIRST_ALICE = "lszZl36THjJyIvvpWJuCh6D8JV0="
SECOND_ALICE = "xISc2FPij9wLkaDRUzhwH8NBgKc="  # the same with -hmac second-secret
#   printf '%s' '1700000060:a%3Ab%25c' | openssl dgst -sha1 -hmac s -binary | base64
ESCAPED = "J7uJZGOm2rvSs49tnt0QTe/GEm0="


def test_password_is_base64_of_hmac_sha1():
    # RFC 2202, HMAC-SHA1 test case 2: effcdf6ae5eb2fa2d27416d5f184df9c259a7c79
    assert password("Jefe", "what do ya want for nothing?") == "7/zfauXrL6LSdBbV8YTfnCWafHk="
    assert password("first-secret", "1700086400:alice") == FIRST_ALICE


def test_issue_with_the_first_secret():
    issuer = TurnIssuer(("first-secret", "second-secret"), URIS, TTL)
    credential = issuer.issue("alice", NOW)
    assert credential == TurnCredential("1700086400:alice", FIRST_ALICE, TTL, 1_700_086_400, URIS)
    # Written out by hand as well, so the test does not lean on password() alone.
    digest = hmac.new(b"first-secret", b"1700086400:alice", hashlib.sha1).digest()
    assert credential.password == base64.b64encode(digest).decode()


def test_the_rotation_secret_never_signs():
    """The second secret is only for the TURN server to accept; the first signs everything."""
    credential = TurnIssuer(("first-secret", "second-secret"), URIS, TTL).issue("alice", NOW)
    assert credential.password != SECOND_ALICE
    assert password("second-secret", credential.username) == SECOND_ALICE
    # With the order swapped, the second one signs.
    swapped = TurnIssuer(("second-secret", "first-secret"), URIS, TTL).issue("alice", NOW)
    assert swapped.password == SECOND_ALICE


@pytest.mark.parametrize(
    ("now", "ttl", "expected"),
    [
        (NOW, 60, NOW + 60),
        (NOW + 0.999, 60, NOW + 60),  # fractions of a second are dropped, never rounded up
        (NOW + 1.0, 60, NOW + 61),
        (0, 1, 1),
        (NOW, TTL, 1_700_086_400),
    ],
)
def test_expiry_is_whole_seconds(now, ttl, expected):
    assert expiry(now, ttl) == expected
    assert TurnIssuer(("s",), URIS, ttl).issue("u", now).expires == expected


@pytest.mark.parametrize(
    ("user", "escaped"),
    [
        ("alice", "alice"),
        ("a:b", "a%3Ab"),
        ("a%3Ab", "a%253Ab"),  # so "a:b" and a user literally named "a%3Ab" stay apart
        ("::", "%3A%3A"),
        ("%", "%25"),
        ("é:漢", "é%3A漢"),
        ("1700000000", "1700000000"),  # digits are fine: the expiry is the part before ':'
    ],
)
def test_escape_user(user, escaped):
    assert escape_user(user) == escaped
    assert ":" not in escape_user(user)


def test_escaped_user_signs_its_escaped_name():
    credential = TurnIssuer(("s",), URIS, 60).issue("a:b%c", NOW)
    assert credential.username == "1700000060:a%3Ab%25c"
    assert credential.username.count(":") == 1
    assert credential.password == ESCAPED


def test_empty_user_is_refused():
    with pytest.raises(ValueError, match="empty"):
        escape_user("")
    with pytest.raises(ValueError, match="empty"):
        TurnIssuer(("s",), URIS, 60).issue("", NOW)


def test_username_length_boundary():
    prefix = f"{NOW}:"
    longest = "u" * (MAX_USERNAME_BYTES - len(prefix))
    assert len(username(longest, NOW).encode()) == MAX_USERNAME_BYTES == 508
    with pytest.raises(ValueError, match="508 bytes"):
        username(longest + "u", NOW)
    # Counted in bytes after escaping: each ':' takes three.
    with pytest.raises(ValueError, match="508 bytes"):
        username(":" * (len(longest) // 3 + 1), NOW)
    assert username(":" * (len(longest) // 3), NOW).startswith(prefix)
    # and in UTF-8 bytes, not characters
    with pytest.raises(ValueError, match="508 bytes"):
        username("é" * (len(longest) // 2 + 1), NOW)


def test_credentials_document():
    credential = TurnIssuer(("first-secret", "second-secret"), URIS, TTL).issue("alice", NOW)
    entry = {"urls": list(URIS), "username": "1700086400:alice", "credential": FIRST_ALICE}
    assert credentials_document(credential) == {
        "username": "1700086400:alice",
        "password": FIRST_ALICE,
        "ttl": TTL,
        "uris": list(URIS),
        "iceServers": [entry],
    }
    assert credential.ice_server() == entry


def test_ice_servers_append_turn_to_the_configured_ones():
    credential = TurnIssuer(("s",), URIS, 60).issue("u", NOW)
    stun = {"urls": "stun:stun.example.com"}
    assert ice_servers(credential) == (credential.ice_server(),)
    assert ice_servers(credential, None) == (credential.ice_server(),)
    assert ice_servers(credential, ()) == (credential.ice_server(),)
    assert ice_servers(credential, (stun,)) == (stun, credential.ice_server())
    assert ice_servers(credential, [stun, stun]) == (stun, stun, credential.ice_server())


def test_fresh_per_call_and_per_user():
    issuer = TurnIssuer(("s",), URIS, 60)
    assert issuer.issue("u", NOW) == issuer.issue("u", NOW + 0.5)  # same second: same values
    assert issuer.issue("u", NOW).password != issuer.issue("u", NOW + 1).password
    assert issuer.issue("u", NOW).password != issuer.issue("v", NOW).password


def test_secrets_never_in_reprs():
    issuer = TurnIssuer(("first-secret", "second-secret"), URIS, TTL)
    credential = issuer.issue("alice", NOW)
    assert "secret" not in repr(issuer)
    assert FIRST_ALICE not in repr(credential)
    assert "1700086400:alice" in repr(credential)


@pytest.mark.parametrize(
    ("secrets", "uris", "ttl", "message"),
    [
        ((), URIS, 60, "at least one secret"),
        (("s", ""), URIS, 60, "no empty one"),
        (("",), URIS, 60, "no empty one"),
        (("s",), (), 60, "at least one URI"),
        (("s",), URIS, 0, "positive"),
        (("s",), URIS, -1, "positive"),
    ],
)
def test_issuer_refuses_what_cannot_work(secrets, uris, ttl, message):
    with pytest.raises(ValueError, match=message):
        TurnIssuer(secrets, uris, ttl)


def test_smallest_issuer():
    credential = TurnIssuer(("s",), ("turn:h",), 1).issue("u", 0)
    assert credential == TurnCredential("1:u", password("s", "1:u"), 1, 1, ("turn:h",))


# --- a Signal-Fire welcome with its own ICE servers (core/signalfire.py) ------------------------


class _Conn:
    closing = False


def _welcome_ice(effects: tuple[object, ...]) -> object:
    (send,) = effects
    assert isinstance(send, Send)
    return orjson.loads(send.payload)["data"].get("configuration")


def _ids(*letters: str) -> Callable[[], str]:
    queue = iter(letter * 21 for letter in letters)
    return lambda: next(queue)


def test_welcome_carries_the_ice_servers_of_its_opening():
    """TURN configured: each welcome has the list the hub made at that connection's opening."""
    node_ice = ({"urls": "stun:127.0.0.1"},)
    own = ice_servers(TurnIssuer(("s",), URIS, 60).issue("u", NOW), node_ice)
    m = SignalFireNode("n", ice_servers=node_ice, new_id=_ids("A", "B"))
    (claim,) = m.on_open(_Conn(), False, own)
    assert _welcome_ice(m.on_claimed(claim, True)) == {"iceServers": list(own)}
    # Another connection without its own list gets the node's, as without TURN.
    (claim,) = m.on_open(_Conn(), False)
    assert _welcome_ice(m.on_claimed(claim, True)) == {"iceServers": list(node_ice)}


def test_welcome_without_ice_servers_anywhere_has_no_configuration():
    m = SignalFireNode("n", new_id=_ids("A"))
    (claim,) = m.on_open(_Conn(), True, None)
    assert _welcome_ice(m.on_claimed(claim, True)) is None


def test_own_ice_servers_survive_an_id_collision():
    """A claim that collides is retried with a new id; the welcome still has the opening's list."""
    own = ({"urls": ["turn:h"], "username": "1:u", "credential": "x"},)
    m = SignalFireNode("n", new_id=_ids("A", "B"))
    conn = _Conn()
    (first,) = m.on_open(conn, False, own)
    (second,) = m.on_claimed(first, False)
    assert isinstance(second, Claim) and second.peer_id == "B" * 21
    assert _welcome_ice(m.on_claimed(second, True)) == {"iceServers": list(own)}
