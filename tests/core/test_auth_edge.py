"""Authentication at the edge without sockets (core/auth.py): where a token is read, how a
connection is described, every refusal by its status and text, and the connect webhook's
questions, answers and cache. The HTTP side is tests/server/test_auth.py's."""

from __future__ import annotations

import jwt
import orjson
import pytest

from polysignal.core.auth import (
    CHALLENGE,
    MAX_WEBHOOK_ANSWER,
    AuthError,
    Gate,
    Identity,
    JwtVerifier,
    Refused,
    WebhookAnswers,
    WebhookUnavailable,
    granted,
    query_without_token,
    refusal,
    split_token_path,
    token_of,
    webhook_answer,
    webhook_question,
    webhook_unavailable,
)
from polysignal.protocols.websocket import HandshakeError

NOW = 1_800_000_000.0
SECRET = "s3cret-of-the-app-backend-0123456789"


def token(**claims: object) -> str:
    return jwt.encode({"sub": "alice", "exp": NOW + 60, **claims}, SECRET, algorithm="HS256")


def gate(*protocols: str, verifier: JwtVerifier | None = None) -> Gate:
    return Gate(protocols, "polysignal_token", verifier)


# --- where the token is -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "split"),
    [
        ("/token/abc/introduction/x", ("/introduction/x", "abc")),
        ("/token/abc/", ("/", "abc")),
        ("/token/abc", ("/", "abc")),
        ("/token/", ("/", None)),
        ("/token//x", ("/x", None)),
        ("/tokens/abc", ("/tokens/abc", None)),
        ("/token", ("/token", None)),
        ("/x/token/abc", ("/x/token/abc", None)),
    ],
)
def test_the_token_path_prefix(path, split):
    assert split_token_path(path) == split


@pytest.mark.parametrize(
    ("query", "authorization", "cookie", "found"),
    [
        ({"token": "q"}, "Bearer h", "polysignal_token=c", "q"),
        ({"token": ""}, "Bearer h", None, "h"),
        ({}, "  bearer   h  ", None, "h"),
        ({}, "BEARER h", None, "h"),
        ({}, "Bearer", "polysignal_token=c", "c"),
        ({}, "Bearer    ", "polysignal_token=c", "c"),
        ({}, "Basic h", "polysignal_token=c", "c"),
        ({}, None, "other=1; polysignal_token=c", "c"),
        ({}, None, "other=1", None),
        ({}, None, "polysignal_token=", None),
        ({}, None, "", None),
        ({}, None, None, None),
        ({}, None, 'polysignal_token="', None),  # a cookie that does not parse
        ({}, None, "polysignal_token=c; $x=y", None),  # nor one the parser refuses
    ],
)
def test_where_a_token_is_read_first(query, authorization, cookie, found):
    assert token_of(query, authorization, cookie, "polysignal_token") == found


def test_the_query_loses_only_its_token():
    assert query_without_token("room=1&token=secret&b=") == "room=1&b="
    assert query_without_token("token=a&token=b") == ""
    assert query_without_token("a=x%20y") == "a=x+y"
    assert query_without_token("") == ""


def test_a_connection_is_described_without_its_token():
    g = gate("topics")
    assert g.describe("/x", "room=1&token=q", "https://app.example", "10.0.0.1", None, None) == (
        "q",
        {"path": "/x", "query": "room=1", "origin": "https://app.example", "address": "10.0.0.1"},
    )
    # A token from a path prefix wins over the query's, which is still left out.
    assert g.describe("/", "token=q", None, "a", "Bearer h", None, "p") == (
        "p",
        {"path": "/", "query": "", "origin": None, "address": "a"},
    )
    # The cookie of the gate's own name.
    assert g.describe("/", "", None, "a", None, "polysignal_token=c", None)[0] == "c"
    assert Gate(("topics",), "other", None).describe("/", "", None, "a", None, "x=c")[0] is None


# --- the gate -------------------------------------------------------------------------------------


def test_which_protocols_require_a_token():
    assert gate().on is False
    assert gate().required("topics") is False
    g = gate("relay", "peerjs")
    assert g.on is True
    assert g.required("relay") is True and g.required("peerjs") is True
    assert g.required("topics") is False


def test_a_jwt_is_verified_on_the_callers_clock():
    g = gate("topics", verifier=JwtVerifier(SECRET, leeway=0))
    assert g.verify(token(), NOW) == Identity("alice", expires=NOW + 60)
    assert g.refused == 0
    assert g.verify(None, NOW) == Refused(401, "authentication required: no token", CHALLENGE)
    assert g.verify(token(), NOW + 61) == Refused(
        401, "authentication failed: the token has expired", CHALLENGE
    )
    assert g.verify("nope", NOW).message == "authentication failed: the token is not a valid JWT"
    assert g.refused == 3


def test_an_id_the_identity_may_not_use_is_refused_403():
    g = gate("relay")
    alice = Identity("alice")
    assert g.refuse_id(alice, "alice") is None
    assert g.refused == 0
    refused = g.refuse_id(alice, "bob")
    assert refused == Refused(403, "the id 'bob' is not allowed for this token", ())
    assert refused.detail == ""
    assert g.refused == 1
    # A long id is named by its first hundred characters.
    assert g.refuse_id(alice, "b" * 101) == Refused(
        403, f"the id {'b' * 100!r} is not allowed for this token"
    )
    assert g.refused == 2


def test_the_webhooks_refusals():
    g = gate("topics")
    denied = g.webhook_refusal(AuthError("denied by the webhook"))
    assert denied == Refused(401, "authentication refused: denied by the webhook", CHALLENGE)
    assert denied.detail == ""
    away = g.webhook_refusal(WebhookUnavailable("webhook http://h/: timed out"))
    assert away == Refused(503, "authentication unavailable; try again", ())
    assert away.detail == "webhook http://h/: timed out"  # for the log only
    assert g.refused == 2


def test_a_refusal_is_a_handshake_error_and_only_a_401_challenges():
    assert isinstance(refusal(401, "x"), HandshakeError)
    assert refusal(401, "x").headers == (("WWW-Authenticate", 'Bearer realm="polysignal"'),)
    assert refusal(403, "x").headers == ()
    assert refusal(503, "x", "why").detail == "why"
    assert refusal(503, "x", "why") == refusal(503, "x", "another reason")  # detail not compared
    assert gate().refuse(400, "m", "d") == Refused(400, "m", (), "d")


# --- the webhook's questions and answers ----------------------------------------------------------


def test_the_question_is_sorted_json_with_the_token():
    question = webhook_question(
        "relay", {"path": "/p", "query": "", "origin": None, "address": "a"}, "t"
    )
    assert question == (
        b'{"address":"a","origin":null,"path":"/p","protocol":"relay","query":"","token":"t"}'
    )
    assert webhook_question("topics", {}, None) == b'{"protocol":"topics","token":null}'


@pytest.mark.parametrize(
    ("status", "body", "message"),
    [
        (500, b'{"allow": true, "sub": "x"}', "the webhook answered 500"),
        (201, b'{"allow": true, "sub": "x"}', "the webhook answered 201"),
        (200, b"not json", "the webhook's answer is not JSON"),
        (200, b"", "the webhook's answer is not JSON"),
        (200, b"[true]", "denied by the webhook"),
        (200, b'{"allow": false, "sub": "x"}', "denied by the webhook"),
        (200, b'{"allow": 1, "sub": "x"}', "denied by the webhook"),
        (200, b'{"allow": "true", "sub": "x"}', "denied by the webhook"),
        (200, b'{"sub": "x"}', "denied by the webhook"),
        (
            200,
            b'{"allow": true}',
            "the webhook's answer: the token names no subject ('sub' must be a non-empty string)",
        ),
        (
            200,
            b'{"allow": true, "sub": "x", "topics": "a"}',
            "the webhook's answer: the token's 'topics' must be a list of at most 256 strings",
        ),
    ],
)
def test_every_denial_of_the_webhook_says_why(status, body, message):
    answer = webhook_answer(status, body)
    assert isinstance(answer, AuthError)
    assert str(answer) == message


def test_an_allowing_answer_gives_its_identity():
    body = orjson.dumps({"allow": True, "sub": "carol", "topics": ["open-*"], "ids": ["c"]})
    assert webhook_answer(200, body) == Identity("carol", ("open-*",), ("c",), None, None)


def test_the_answers_length_at_its_exact_boundary():
    head = b'{"allow": true, "sub": "x", "pad": "'
    longest = head + b"a" * (MAX_WEBHOOK_ANSWER - len(head) - 2) + b'"}'
    assert len(longest) == MAX_WEBHOOK_ANSWER == 64 * 1024
    assert webhook_answer(200, longest) == Identity("x")
    too_long = webhook_answer(200, longest + b" ")
    assert isinstance(too_long, AuthError)
    assert str(too_long) == "the webhook's answer is too long"


def test_a_denial_is_raised_afresh_for_each_question():
    assert granted(Identity("x")) == Identity("x")
    denial = AuthError("denied by the webhook")
    with pytest.raises(AuthError) as caught:
        granted(denial)
    assert caught.value is not denial
    assert str(caught.value) == "denied by the webhook"


@pytest.mark.parametrize(
    ("error", "message"),
    [
        (TimeoutError(), "webhook http://h/: timed out"),
        (ConnectionRefusedError("at 127.0.0.1:1"), "webhook http://h/: ConnectionRefusedError"),
        (OSError("secret text"), "webhook http://h/: OSError"),
    ],
)
def test_why_the_webhook_could_not_be_asked(error, message):
    unavailable = webhook_unavailable("http://h/", error)
    assert isinstance(unavailable, WebhookUnavailable)
    assert str(unavailable) == message


# --- the answers kept -----------------------------------------------------------------------------


def test_an_answer_is_kept_until_its_ttl_exactly():
    answers: WebhookAnswers[object] = WebhookAnswers(ttl=10.0, size=2)
    assert answers.cached(b"q", 0.0) is None
    answers.answered(b"q", Identity("a"), 100.0)
    assert answers.cached(b"q", 100.0) == Identity("a")
    assert answers.cached(b"q", 109.999) == Identity("a")
    assert answers.cached(b"q", 110.0) is None  # expired at exactly its ttl
    assert answers.cached(b"other", 100.0) is None
    denial = AuthError("denied by the webhook")
    answers.answered(b"d", denial, 100.0)
    assert answers.cached(b"d", 105.0) is denial  # denials are kept too


def test_at_most_size_answers_are_kept_the_oldest_dropped_first():
    answers: WebhookAnswers[object] = WebhookAnswers(ttl=10.0, size=2)
    answers.answered(b"a", Identity("a"), 0.0)
    answers.answered(b"b", Identity("b"), 0.0)
    assert len(answers) == 2
    answers.answered(b"a", Identity("a2"), 1.0)  # answered again: the newest now
    answers.answered(b"c", Identity("c"), 1.0)
    assert len(answers) == 2
    assert answers.cached(b"b", 1.0) is None
    assert answers.cached(b"a", 1.0) == Identity("a2")
    assert answers.cached(b"c", 1.0) == Identity("c")


@pytest.mark.parametrize(("ttl", "size"), [(0.0, 10), (10.0, 0)])
def test_nothing_is_kept_without_a_ttl_or_a_size(ttl, size):
    answers: WebhookAnswers[object] = WebhookAnswers(ttl=ttl, size=size)
    answers.answered(b"q", Identity("a"), 0.0)
    assert len(answers) == 0
    assert answers.cached(b"q", 0.0) is None


def test_a_question_on_its_way_is_waited_for_until_answered():
    answers: WebhookAnswers[str] = WebhookAnswers(ttl=10.0, size=10)
    assert answers.waiting(b"q") is None
    answers.asking(b"q", "future-1")
    assert answers.waiting(b"q") == "future-1"
    assert answers.waiting(b"other") is None
    answers.answered(b"q", Identity("a"), 0.0)
    assert answers.waiting(b"q") is None
    assert answers.cached(b"q", 0.0) == Identity("a")


def test_a_question_that_failed_is_asked_again_and_its_waiters_refused():
    answers: WebhookAnswers[str] = WebhookAnswers(ttl=10.0, size=10)
    answers.asking(b"q", "future-1")
    away = WebhookUnavailable("webhook http://h/: timed out")
    assert answers.failed(b"q", away) is away
    assert answers.waiting(b"q") is None
    assert answers.cached(b"q", 0.0) is None
    answers.asking(b"q", "future-2")
    cancelled = answers.failed(b"q", KeyboardInterrupt())
    assert isinstance(cancelled, WebhookUnavailable)
    assert str(cancelled) == "cancelled"
    assert answers.waiting(b"q") is None
    assert str(answers.failed(b"never asked", ValueError("x"))) == "cancelled"
