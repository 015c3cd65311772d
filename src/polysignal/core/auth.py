"""Who a client is, and what it may do: identities from verified tokens (docs/security.md).

With ``AUTH`` on for a protocol, each connection of it presents a token before any state is
created. Either a JWT, verified here with PyJWT (``JwtVerifier``), or whatever the operator's
connect webhook accepts (``server/auth.py``, whose answer carries the same claims). Both give an
``Identity``:

* ``sub``: who the client is (required);
* ``topics``: the topic patterns it may subscribe and publish to (absent: any topic);
* ``ids``: the relay peer ids, PeerJS ids and Signal-Fire ids it may use (absent: ``sub`` only);
* ``rooms``: the rooms it may create or join (absent: any room).

A pattern is matched whole, case-sensitively, with ``*`` for any run of characters and ``?`` for
one (``fnmatch.fnmatchcase``): ``doc-*`` allows ``doc-1`` and ``doc-`` but not ``x-doc-1``.

Time is passed in, never read here: ``exp`` and ``nbf`` are checked against the caller's clock
with ``leeway`` seconds of skew allowed, and a JWT must carry ``exp`` (tokens are short-lived).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key

MAX_TOKEN_LENGTH = 4096
"""Longest token read; a longer one is refused unread."""

MIN_SECRET_BYTES = 32
"""Shortest HMAC secret accepted: as long as the SHA-256 output, as RFC 7518 §3.2 asks."""

MAX_PATTERNS = 256
"""Most entries of one claim list."""


class AuthError(Exception):
    """A token that does not authenticate; the message says why, never quoting the token."""


@dataclass(frozen=True, slots=True)
class Identity:
    """An authenticated client and what it may do."""

    sub: str
    topics: tuple[str, ...] | None = None
    ids: tuple[str, ...] | None = None
    rooms: tuple[str, ...] | None = None
    expires: float | None = None

    def may_use_topic(self, topic: str) -> bool:
        return self.topics is None or _matches(self.topics, topic)

    def may_use_id(self, peer_id: str) -> bool:
        """True for an id the claims allow (``sub`` itself when they name none)."""
        if self.ids is None:
            return peer_id == self.sub
        return _matches(self.ids, peer_id)

    def may_use_room(self, room: str) -> bool:
        return self.rooms is None or _matches(self.rooms, room)

    def split_topics(self, topics: tuple[str, ...]) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """``topics`` as (allowed, refused), each in the order given."""
        if self.topics is None:
            return topics, ()
        allowed = tuple(topic for topic in topics if _matches(self.topics, topic))
        if len(allowed) == len(topics):
            return topics, ()
        return allowed, tuple(topic for topic in topics if not _matches(self.topics, topic))


def refused_topics_error(kind: str, refused: tuple[str, ...]) -> str:
    """The error text of topics a token does not allow (the first three named)."""
    named = ", ".join(repr(topic[:100]) for topic in refused[:3])
    more = f" and {len(refused) - 3} more" if len(refused) > 3 else ""
    return f"{kind}: topic {named}{more} not allowed for this token"


def _matches(patterns: tuple[str, ...], name: str) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def identity_from_claims(claims: Mapping[str, Any], expires: float | None = None) -> Identity:
    """The identity a verified token's ``claims`` (or a webhook's answer) describe."""
    sub = claims.get("sub")
    if not isinstance(sub, str) or not sub:
        raise AuthError("the token names no subject ('sub' must be a non-empty string)")
    return Identity(
        sub=sub,
        topics=_patterns(claims, "topics"),
        ids=_patterns(claims, "ids"),
        rooms=_patterns(claims, "rooms"),
        expires=expires,
    )


def _patterns(claims: Mapping[str, Any], name: str) -> tuple[str, ...] | None:
    value = claims.get(name)
    if value is None:
        return None
    if (
        not isinstance(value, list)
        or len(value) > MAX_PATTERNS
        or not all(isinstance(item, str) for item in value)
    ):
        raise AuthError(f"the token's {name!r} must be a list of at most {MAX_PATTERNS} strings")
    return tuple(value)


# --- JWT --------------------------------------------------------------------------------------

_HMAC = ("HS256", "HS384", "HS512")


def algorithms_for(key: str) -> tuple[str, ...]:
    """The algorithm a key is for: HS256 for a secret; RS256, ES256/384/512 or EdDSA for a PEM
    public key. Raises ValueError for a PEM that is not a public key of those kinds."""
    if not key.lstrip().startswith("-----BEGIN"):
        return ("HS256",)
    try:
        public = load_pem_public_key(key.encode())
    except ValueError:
        raise ValueError("not a PEM public key (a private key must stay with the issuer)") from None
    if isinstance(public, rsa.RSAPublicKey):
        return ("RS256",)
    if isinstance(public, ec.EllipticCurvePublicKey):
        by_curve = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}
        algorithm = by_curve.get(public.curve.name)
        if algorithm is None:
            raise ValueError(f"EC curve {public.curve.name} is not one JWTs use")
        return (algorithm,)
    if isinstance(public, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
        return ("EdDSA",)
    raise ValueError(f"a {type(public).__name__} cannot verify JWTs")


class JwtVerifier:
    """Verifies client JWTs: signature, ``exp`` (required), ``nbf``, ``aud``, ``iss``."""

    def __init__(
        self,
        key: str,
        algorithms: Sequence[str] = (),
        audience: str | None = None,
        issuer: str | None = None,
        leeway: float = 30.0,
    ) -> None:
        if not key:
            raise ValueError("no key")
        inferred = algorithms_for(key)
        self.algorithms = tuple(algorithms) or inferred
        pem = key.lstrip().startswith("-----BEGIN")
        for algorithm in self.algorithms:
            if algorithm not in jwt.algorithms.get_default_algorithms():
                raise ValueError(f"unknown JWT algorithm {algorithm!r}")
            if pem == (algorithm in _HMAC):
                kind = "a PEM public key" if pem else "an HMAC secret"
                raise ValueError(f"{algorithm} cannot be verified with {kind}")
        if not pem and len(key.encode()) < MIN_SECRET_BYTES:
            raise ValueError(
                f"an HMAC secret must be at least {MIN_SECRET_BYTES} bytes (RFC 7518 §3.2)"
            )
        self.key = key
        self.audience = audience
        self.issuer = issuer
        self.leeway = leeway

    def verify(self, token: str, now: float) -> Identity:
        """The identity ``token`` proves at time ``now`` (unix seconds), or AuthError."""
        if len(token) > MAX_TOKEN_LENGTH:
            raise AuthError(f"token longer than {MAX_TOKEN_LENGTH} characters")
        try:
            claims = jwt.decode(
                token,
                self.key,
                algorithms=list(self.algorithms),
                audience=self.audience,
                issuer=self.issuer,
                options={
                    "require": ["exp"],
                    "verify_exp": False,  # checked below, on the caller's clock
                    "verify_nbf": False,
                    "verify_iat": False,
                    "verify_aud": self.audience is not None,
                    "verify_iss": self.issuer is not None,
                },
            )
        except jwt.ExpiredSignatureError:  # pragma: no cover - verify_exp is off
            raise AuthError("the token has expired") from None
        except jwt.MissingRequiredClaimError as exc:
            raise AuthError(f"the token has no {exc.claim!r} claim") from None
        except jwt.InvalidAudienceError:
            raise AuthError("the token is for another audience") from None
        except jwt.InvalidIssuerError:
            raise AuthError("the token is from another issuer") from None
        except jwt.InvalidSignatureError:
            raise AuthError("the token's signature does not verify") from None
        except jwt.exceptions.InvalidSubjectError:
            raise AuthError(
                "the token names no subject ('sub' must be a non-empty string)"
            ) from None
        except jwt.InvalidAlgorithmError:
            raise AuthError("the token is signed with an algorithm not accepted") from None
        except jwt.InvalidTokenError:
            raise AuthError("the token is not a valid JWT") from None
        exp = _number(claims, "exp")
        if exp is None:
            raise AuthError("the token's 'exp' must be a number")
        if now > exp + self.leeway:
            raise AuthError("the token has expired")
        nbf = _number(claims, "nbf")
        if "nbf" in claims and (nbf is None or now < nbf - self.leeway):
            raise AuthError("the token is not valid yet")
        return identity_from_claims(claims, expires=exp)


def _number(claims: Mapping[str, Any], name: str) -> float | None:
    value = claims.get(name)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)
