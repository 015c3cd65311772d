"""Identities from tokens (core/auth.py): JWT verification on the caller's clock, every refusal
by its message, the claims and their patterns. No sockets; tests/server/test_auth.py has them."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed25519, rsa
from hypothesis import given
from hypothesis import strategies as st

from polysignal.config import ConfigError, Settings
from polysignal.core.auth import (
    MAX_PATTERNS,
    MAX_TOKEN_LENGTH,
    AuthError,
    Identity,
    JwtVerifier,
    algorithms_for,
    identity_from_claims,
)
from polysignal.core.topics import refused_topics_error

NOW = 1_800_000_000.0
SECRET = "s3cret-of-the-app-backend-0123456789"


def token(claims: dict[str, object], key: object = SECRET, algorithm: str = "HS256") -> str:
    return jwt.encode({"sub": "alice", "exp": NOW + 60, **claims}, key, algorithm=algorithm)


def refused(verifier: JwtVerifier, text: str, now: float = NOW) -> str:
    with pytest.raises(AuthError) as caught:
        verifier.verify(text, now)
    return str(caught.value)


def hs256_by_hand(claims: dict[str, object], key: str) -> str:
    """A JWT signed HS256 with ``key``, written without PyJWT (which refuses PEM keys)."""

    def part(data: bytes) -> bytes:
        return base64.urlsafe_b64encode(data).rstrip(b"=")

    head = part(b'{"alg":"HS256","typ":"JWT"}') + b"." + part(json.dumps(claims).encode())
    signature = hmac.new(key.encode(), head, hashlib.sha256).digest()
    return (head + b"." + part(signature)).decode()


def pem(public: object) -> str:
    return public.public_bytes(  # type: ignore[attr-defined, no-any-return]
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()


# --- HS256: every check and its message -----------------------------------------------------


def test_a_valid_token_gives_its_identity():
    identity = JwtVerifier(SECRET).verify(token({"topics": ["doc-*"], "ids": ["a", "b"]}), NOW)
    assert identity == Identity("alice", ("doc-*",), ("a", "b"), None, NOW + 60)


def test_expiry_at_its_exact_boundary_with_the_leeway():
    verifier = JwtVerifier(SECRET, leeway=30)
    text = token({"exp": NOW})
    assert verifier.verify(text, NOW + 30).sub == "alice"  # exp + leeway: still valid
    assert refused(verifier, text, NOW + 30.001) == "the token has expired"
    assert refused(JwtVerifier(SECRET, leeway=0), text, NOW + 0.001) == "the token has expired"


def test_not_before_at_its_exact_boundary_with_the_leeway():
    verifier = JwtVerifier(SECRET, leeway=10)
    text = token({"nbf": NOW + 10})
    assert verifier.verify(text, NOW).sub == "alice"  # nbf - leeway: valid
    assert refused(verifier, text, NOW - 0.001) == "the token is not valid yet"
    assert refused(verifier, token({"nbf": "soon"})) == "the token is not valid yet"


@pytest.mark.parametrize(
    ("claims", "message"),
    [
        ({"exp": None}, "the token has no 'exp' claim"),
        ({"exp": "soon"}, "the token's 'exp' must be a number"),
        ({"exp": True}, "the token's 'exp' must be a number"),
        ({"sub": None}, "the token names no subject ('sub' must be a non-empty string)"),
        ({"sub": ""}, "the token names no subject ('sub' must be a non-empty string)"),
        ({"sub": 7}, "the token names no subject ('sub' must be a non-empty string)"),
        ({"topics": "doc-*"}, "the token's 'topics' must be a list of at most 256 strings"),
        ({"ids": [1]}, "the token's 'ids' must be a list of at most 256 strings"),
        (
            {"rooms": ["r"] * (MAX_PATTERNS + 1)},
            "the token's 'rooms' must be a list of at most 256 strings",
        ),
    ],
)
def test_bad_claims_are_refused_by_name(claims, message):
    assert refused(JwtVerifier(SECRET), token(claims)) == message


def test_a_token_without_exp_is_refused():
    text = jwt.encode({"sub": "alice"}, SECRET, algorithm="HS256")
    assert refused(JwtVerifier(SECRET), text) == "the token has no 'exp' claim"


def test_as_many_patterns_as_allowed_are_read():
    identity = JwtVerifier(SECRET).verify(token({"rooms": ["r"] * MAX_PATTERNS}), NOW)
    assert identity.rooms == ("r",) * MAX_PATTERNS


def test_a_wrong_signature_an_other_algorithm_and_garbage_are_refused():
    verifier = JwtVerifier(SECRET)
    assert refused(verifier, token({}, key="another secret of the same length, 0123")) == (
        "the token's signature does not verify"
    )
    assert refused(verifier, token({}, key=SECRET * 2, algorithm="HS512")) == (
        "the token is signed with an algorithm not accepted"
    )
    unsigned = jwt.encode({"sub": "alice", "exp": NOW + 60}, None, algorithm="none")
    assert refused(verifier, unsigned) == "the token is signed with an algorithm not accepted"
    assert refused(verifier, "not.a.jwt") == "the token is not a valid JWT"
    assert refused(verifier, "") == "the token is not a valid JWT"


def test_audience_and_issuer_when_configured():
    verifier = JwtVerifier(SECRET, audience="polysignal", issuer="https://app.example")
    good = token({"aud": "polysignal", "iss": "https://app.example"})
    assert verifier.verify(good, NOW).sub == "alice"
    assert refused(verifier, token({"aud": "other", "iss": "https://app.example"})) == (
        "the token is for another audience"
    )
    assert refused(verifier, token({"aud": "polysignal", "iss": "https://evil.example"})) == (
        "the token is from another issuer"
    )
    assert refused(verifier, token({"iss": "https://app.example"})) == (
        "the token has no 'aud' claim"
    )
    # Without an audience configured, a token's aud is not checked.
    assert JwtVerifier(SECRET).verify(token({"aud": "anything"}), NOW).sub == "alice"


def test_token_length_at_its_exact_boundary():
    verifier = JwtVerifier(SECRET)
    assert refused(verifier, "x" * MAX_TOKEN_LENGTH) == "the token is not a valid JWT"
    assert refused(verifier, "x" * (MAX_TOKEN_LENGTH + 1)) == (
        f"token longer than {MAX_TOKEN_LENGTH} characters"
    )


# --- public keys ------------------------------------------------------------------------------


def test_rs256_es256_and_eddsa_with_the_algorithm_of_the_key():
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ec_key = ec.generate_private_key(ec.SECP256R1())
    ed_key = ed25519.Ed25519PrivateKey.generate()
    for private, algorithm in ((rsa_key, "RS256"), (ec_key, "ES256"), (ed_key, "EdDSA")):
        verifier = JwtVerifier(pem(private.public_key()))
        assert verifier.algorithms == (algorithm,)
        assert verifier.verify(token({}, private, algorithm), NOW).sub == "alice"
        # An HS256 token signed with the public key's text: the algorithm-confusion attack.
        forged = hs256_by_hand({"sub": "mallory", "exp": NOW + 60}, pem(private.public_key()))
        assert refused(verifier, forged) == "the token is signed with an algorithm not accepted"
    other = ec.generate_private_key(ec.SECP256R1())
    assert refused(JwtVerifier(pem(ec_key.public_key())), token({}, other, "ES256")) == (
        "the token's signature does not verify"
    )


def test_algorithms_of_keys():
    assert algorithms_for("a secret") == ("HS256",)
    assert JwtVerifier("x" * 32).algorithms == ("HS256",)  # the shortest secret accepted
    assert algorithms_for(pem(ec.generate_private_key(ec.SECP384R1()).public_key())) == ("ES384",)
    assert algorithms_for(pem(ec.generate_private_key(ec.SECP521R1()).public_key())) == ("ES512",)
    with pytest.raises(ValueError) as caught:
        algorithms_for(pem(ec.generate_private_key(ec.SECP256K1()).public_key()))
    assert str(caught.value) == "EC curve secp256k1 is not one JWTs use"
    private_pem = (
        ed25519.Ed25519PrivateKey.generate()
        .private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        .decode()
    )
    with pytest.raises(ValueError) as caught:
        algorithms_for(private_pem)
    assert str(caught.value) == "not a PEM public key (a private key must stay with the issuer)"
    with pytest.raises(ValueError) as caught:
        algorithms_for(pem(dsa.generate_private_key(key_size=2048).public_key()))
    assert str(caught.value) == "a DSAPublicKey cannot verify JWTs"


@pytest.mark.parametrize(
    ("key", "algorithms", "message"),
    [
        ("", (), "no key"),
        ("x" * 31, (), "an HMAC secret must be at least 32 bytes (RFC 7518 §3.2)"),
        (SECRET, ("RS256",), "RS256 cannot be verified with an HMAC secret"),
        (SECRET, ("HS999",), "unknown JWT algorithm 'HS999'"),
    ],
)
def test_a_key_that_cannot_verify_is_refused(key, algorithms, message):
    with pytest.raises(ValueError) as caught:
        JwtVerifier(key, algorithms)
    assert str(caught.value) == message


def test_a_public_key_cannot_be_an_hmac_secret():
    key = pem(ed25519.Ed25519PrivateKey.generate().public_key())
    with pytest.raises(ValueError) as caught:
        JwtVerifier(key, ("HS256",))
    assert str(caught.value) == "HS256 cannot be verified with a PEM public key"


# --- settings ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            {"AUTH": "all"},
            "AUTH: needs AUTH_JWT_KEY, AUTH_JWT_KEY_FILE or AUTH_WEBHOOK_URL to check tokens",
        ),
        (
            {"AUTH": "topics,dance"},
            "AUTH: unknown protocol 'dance'; expected all, off, or a comma-separated list of "
            "topics, relay, signalfire, peerjs, rooms",
        ),
        (
            {"AUTH": "all", "AUTH_JWT_KEY": SECRET, "AUTH_WEBHOOK_URL": "http://127.0.0.1:1/"},
            "AUTH_WEBHOOK_URL: set a JWT key (AUTH_JWT_KEY, AUTH_JWT_KEY_FILE) or a webhook, "
            "not both",
        ),
        (
            {"AUTH_JWT_KEY": SECRET, "AUTH_JWT_KEY_FILE": "/nonexistent"},
            "AUTH_JWT_KEY_FILE: set AUTH_JWT_KEY or AUTH_JWT_KEY_FILE, not both",
        ),
        (
            {"AUTH_JWT_KEY_FILE": "/nonexistent/key.pem"},
            "AUTH_JWT_KEY_FILE: cannot read '/nonexistent/key.pem' ([Errno 2] No such file or "
            "directory: '/nonexistent/key.pem')",
        ),
        (
            {"AUTH_JWT_KEY": SECRET, "AUTH_JWT_ALGORITHMS": "RS256"},
            "AUTH_JWT_KEY: RS256 cannot be verified with an HMAC secret",
        ),
        (
            {"AUTH_WEBHOOK_URL": "ftp://x/"},
            "AUTH_WEBHOOK_URL: expected an http:// or https:// URL, got 'ftp://x/'",
        ),
        (
            {"AUTH_WEBHOOK_URL": "https://u:pw@hook.example/?token=t"},
            None,
        ),
        ({"AUTH_WEBHOOK_TIMEOUT": "0"}, "AUTH_WEBHOOK_TIMEOUT: must be more than 0"),
        (
            {"AUTH_WEBHOOK_CACHE_SIZE": "-1"},
            "AUTH_WEBHOOK_CACHE_SIZE: must not be negative, got -1",
        ),
        (
            {"AUTH_WEBHOOK_CACHE_SECONDS": "-1"},
            "AUTH_WEBHOOK_CACHE_SECONDS: must not be negative, got -1.0",
        ),
        ({"AUTH_JWT_LEEWAY": "-1"}, "AUTH_JWT_LEEWAY: must not be negative, got -1.0"),
    ],
)
def test_auth_settings_are_checked_by_name(env, message):
    if message is None:
        Settings.from_env(env)  # a webhook URL with credentials is fine: they are only hidden
        return
    with pytest.raises(ConfigError) as caught:
        Settings.from_env(env)
    assert str(caught.value) == message


def test_auth_names_protocols(tmp_path):
    read = Settings.from_env
    every = ("topics", "relay", "signalfire", "peerjs", "rooms")
    assert read({"AUTH": "all", "AUTH_JWT_KEY": SECRET}).auth.auth == every
    assert read({"AUTH": "off"}).auth.auth == ()
    assert read({"AUTH": "Signal-Fire, topics", "AUTH_JWT_KEY": SECRET}).auth.auth == (
        "topics",
        "signalfire",
    )
    key = tmp_path / "key.pem"
    key.write_text(pem(ed25519.Ed25519PrivateKey.generate().public_key()))
    settings = read({"AUTH": "relay", "AUTH_JWT_KEY_FILE": str(key)})
    assert settings.auth.auth_jwt_key_file == str(key)


# --- identities and patterns ------------------------------------------------------------------


def test_ids_default_to_the_subject_alone():
    identity = identity_from_claims({"sub": "alice"})
    assert identity.may_use_id("alice")
    assert not identity.may_use_id("alice2")
    assert not identity.may_use_id("bob")
    listed = identity_from_claims({"sub": "alice", "ids": ["alice-*", "desk"]})
    assert listed.may_use_id("alice-phone") and listed.may_use_id("desk")
    assert not listed.may_use_id("alice")  # the list replaces the default
    assert not listed.may_use_id("Desk")  # case-sensitive


def test_patterns_match_whole_names():
    identity = identity_from_claims({"sub": "a", "topics": ["doc-*", "lobby"], "rooms": ["r?"]})
    assert identity.may_use_topic("doc-1") and identity.may_use_topic("doc-")
    assert identity.may_use_topic("lobby")
    assert not identity.may_use_topic("x-doc-1") and not identity.may_use_topic("lobby2")
    assert identity.may_use_room("r1") and not identity.may_use_room("r12")
    anything = identity_from_claims({"sub": "a"})
    assert anything.may_use_topic("whatever") and anything.may_use_room("any")
    nothing = identity_from_claims({"sub": "a", "topics": []})
    assert not nothing.may_use_topic("whatever")


def test_topics_split_in_order():
    identity = identity_from_claims({"sub": "a", "topics": ["ok-*"]})
    assert identity.split_topics(("ok-1", "no", "ok-2", "nope")) == (
        ("ok-1", "ok-2"),
        ("no", "nope"),
    )
    assert identity.split_topics(("ok-1",)) == (("ok-1",), ())
    assert identity_from_claims({"sub": "a"}).split_topics(("x",)) == (("x",), ())


def test_the_refused_topics_error_names_three():
    assert (
        refused_topics_error("publish", ("a",)) == "publish: topic 'a' not allowed for this token"
    )
    assert refused_topics_error("subscribe", ("a", "b", "c")) == (
        "subscribe: topic 'a', 'b', 'c' not allowed for this token"
    )
    assert refused_topics_error("subscribe", ("a", "b", "c", "d", "e")) == (
        "subscribe: topic 'a', 'b', 'c' and 2 more not allowed for this token"
    )
    assert refused_topics_error("publish", ("x" * 150,)) == (
        f"publish: topic {'x' * 100!r} not allowed for this token"
    )


# --- properties: whatever a client sends as a token, a refusal by AuthError, never a crash ----

TOKEN_TEXT = st.text(max_size=300) | st.from_regex(
    r"[A-Za-z0-9_\-]{0,40}(\.[A-Za-z0-9_\-=]{0,60}){0,3}"
)


@given(TOKEN_TEXT)
def test_any_token_text_is_refused_with_auth_error(text):
    with pytest.raises(AuthError):
        JwtVerifier(SECRET).verify(text, NOW)


@given(
    st.dictionaries(
        st.sampled_from(["sub", "topics", "ids", "rooms", "exp", "other"]),
        st.none()
        | st.booleans()
        | st.integers()
        | st.text(max_size=5)
        | st.lists(st.text(max_size=3) | st.integers(), max_size=4),
    )
)
def test_any_claims_give_an_identity_or_auth_error(claims):
    try:
        identity = identity_from_claims(claims)
    except AuthError:
        return
    assert identity.sub == claims["sub"]
    for name in ("topics", "ids", "rooms"):
        value = getattr(identity, name)
        assert value is None or all(isinstance(item, str) for item in value)
