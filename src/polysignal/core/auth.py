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

At the edge (``Gate``): where a connection's token is (``token_of``, ``split_token_path``), how
the connection is described to the webhook and in the refusal logs (the query without its
token), the JWT check and the id check, and the status and text of each refusal (``Refused``).
For the webhook (``server/auth.py`` asks it over HTTP): the question it is asked
(``webhook_question``), what its answer means (``webhook_answer``), and the answers kept
(``WebhookAnswers``: cached for a while, and shared by the questions asked while one is on its
way).
"""

from __future__ import annotations

import fnmatch
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from http.cookies import CookieError, SimpleCookie
from typing import Any, Generic, TypeVar
from urllib.parse import parse_qsl, urlencode

import jwt
import orjson
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from polysignal.protocols.websocket import HandshakeError

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


# --- at the edge: where the token is, and the checks that need no wait ------------------------

TOKEN_PREFIX = "/token/"
"""The path prefix that carries a token (``/token/<token>/...``)."""

CHALLENGE = (("WWW-Authenticate", 'Bearer realm="polysignal"'),)
"""The header of every 401: the client is to present a bearer token."""


def split_token_path(path: str) -> tuple[str, str | None]:
    """``/token/<t>/rest`` -> (``/rest``, ``t``); any other path -> (path, None)."""
    if not path.startswith(TOKEN_PREFIX):
        return path, None
    token, slash, rest = path[len(TOKEN_PREFIX) :].partition("/")
    return slash + rest if slash else "/", token or None


def token_of(
    query: Mapping[str, str], authorization: str | None, cookie: str | None, cookie_name: str
) -> str | None:
    """The token of a request, from its query, ``Authorization`` header or cookie, the first
    found (docs/security.md)."""
    token = query.get("token")
    if token:
        return token
    if authorization is not None:
        scheme, _, credentials = authorization.strip().partition(" ")
        if scheme.lower() == "bearer" and credentials.strip():
            return credentials.strip()
    if cookie:
        try:
            morsel = SimpleCookie(cookie).get(cookie_name)
        except CookieError:
            return None
        if morsel is not None and morsel.value:
            return morsel.value
    return None


def query_without_token(query: str) -> str:
    """The query as logs and the webhook see it besides the token: ``token`` removed."""
    pairs = parse_qsl(query, keep_blank_values=True)
    return urlencode([(name, value) for name, value in pairs if name != "token"])


@dataclass(frozen=True, slots=True)
class Refused(HandshakeError):
    """An authentication refusal, answered before the upgrade (a 401 challenges the client to
    present a bearer token); ``detail`` is for the log only, never for the client."""

    detail: str = field(default="", compare=False)


def refusal(status: int, message: str, detail: str = "") -> Refused:
    """The refusal of ``status`` with ``message``: a 401 carries the challenge."""
    return Refused(status, message, CHALLENGE if status == 401 else (), detail)


class Gate:
    """Which connections present a token (those of ``protocols``), and the checks that need no
    wait: the JWT of ``verifier`` (None: the webhook decides, ``server/auth.py``) and the id a
    connection asks for. Each refusal made here is counted in ``refused``."""

    def __init__(
        self, protocols: Iterable[str], cookie_name: str, verifier: JwtVerifier | None = None
    ) -> None:
        self.protocols = frozenset(protocols)
        self.cookie_name = cookie_name
        self.verifier = verifier
        self.refused = 0

    @property
    def on(self) -> bool:
        """True while any protocol requires a token."""
        return bool(self.protocols)

    def required(self, protocol: str) -> bool:
        return protocol in self.protocols

    def describe(
        self,
        path: str,
        query: str,
        origin: str | None,
        address: str,
        authorization: str | None,
        cookie: str | None,
        token: str | None = None,
    ) -> tuple[str | None, dict[str, Any]]:
        """A connection's token (``token``, from a path prefix, else ``token_of`` its query,
        ``Authorization`` or cookie) and its description (what the webhook is asked and the
        refusal logs name; the query without its token)."""
        if token is None:
            token = token_of(dict(parse_qsl(query)), authorization, cookie, self.cookie_name)
        described = {
            "path": path,
            "query": query_without_token(query),
            "origin": origin,
            "address": address,
        }
        return token, described

    def verify(self, token: str | None, now: float) -> Identity | Refused:
        """The identity ``token`` proves at ``now`` (unix seconds) by the JWT key, or the 401
        refusal saying why not."""
        assert self.verifier is not None
        if token is None:
            return self.refuse(401, "authentication required: no token")
        try:
            return self.verifier.verify(token, now)
        except AuthError as exc:
            return self.refuse(401, f"authentication failed: {exc}")

    def refuse_id(self, identity: Identity, peer_id: str) -> Refused | None:
        """The 403 refusal of a connection asking for an id ``identity`` may not use; None when
        it may."""
        if identity.may_use_id(peer_id):
            return None
        return self.refuse(403, f"the id {peer_id[:100]!r} is not allowed for this token")

    def webhook_refusal(self, error: AuthError | WebhookUnavailable) -> Refused:
        """The refusal of a connection the webhook denied (401), or could not be asked about
        (503: it fails closed, and the client may try again)."""
        if isinstance(error, AuthError):
            return self.refuse(401, f"authentication refused: {error}")
        return self.refuse(503, "authentication unavailable; try again", str(error))

    def refuse(self, status: int, message: str, detail: str = "") -> Refused:
        self.refused += 1
        return refusal(status, message, detail)


# --- the connect webhook's questions and answers ----------------------------------------------

MAX_WEBHOOK_ANSWER = 64 * 1024
"""Largest webhook answer read, in bytes; a longer one denies."""


class WebhookUnavailable(Exception):
    """The webhook could not be asked or did not answer in time."""


def webhook_unavailable(url: str, error: Exception) -> WebhookUnavailable:
    """Why the webhook at ``url`` (as logs may show it) could not be asked: it timed out, or
    the name of the failure (never its text, which may quote the request)."""
    reason = "timed out" if isinstance(error, TimeoutError) else type(error).__name__
    return WebhookUnavailable(f"webhook {url}: {reason}")


def webhook_question(protocol: str, request: Mapping[str, Any], token: str | None) -> bytes:
    """What the webhook is asked about a ``protocol`` connection described by ``request``:
    JSON with sorted keys, so the same question is the same bytes (the key of its answer)."""
    question = {"protocol": protocol, **request, "token": token}
    return orjson.dumps(question, option=orjson.OPT_SORT_KEYS)


def webhook_answer(status: int, body: bytes) -> Identity | AuthError:
    """What the webhook's answer (``status``, and ``body``, read up to one byte more than
    ``MAX_WEBHOOK_ANSWER``) means: the identity it grants, or why it denies. Only a 200 with a
    JSON object holding ``"allow": true`` and valid claims allows."""
    if status != 200:
        return AuthError(f"the webhook answered {status}")
    if len(body) > MAX_WEBHOOK_ANSWER:
        return AuthError("the webhook's answer is too long")
    try:
        answer = orjson.loads(body)
    except orjson.JSONDecodeError:
        return AuthError("the webhook's answer is not JSON")
    if not isinstance(answer, dict) or answer.get("allow") is not True:
        return AuthError("denied by the webhook")
    try:
        return identity_from_claims(answer)
    except AuthError as exc:
        return AuthError(f"the webhook's answer: {exc}")


def granted(answer: Identity | AuthError) -> Identity:
    """The identity of a webhook's ``answer``; a denial is raised afresh (the answer may be
    shared by many questions, each with its own traceback)."""
    if isinstance(answer, AuthError):
        raise AuthError(str(answer))
    return answer


Waiter = TypeVar("Waiter")
"""What the questions asked while one is on its way wait for (the server's future)."""


class WebhookAnswers(Generic[Waiter]):
    """The webhook's answers by question: each kept ``ttl`` seconds, at most ``size`` of them
    (the oldest dropped first; none kept when either is 0), and the questions on their way, so
    the same question asked meanwhile waits for that answer instead of asking again."""

    def __init__(self, ttl: float, size: int) -> None:
        self.ttl = ttl
        self.size = size
        self._kept: OrderedDict[bytes, tuple[float, Identity | AuthError]] = OrderedDict()
        self._asking: dict[bytes, Waiter] = {}

    def __len__(self) -> int:
        return len(self._kept)

    def cached(self, question: bytes, now: float) -> Identity | AuthError | None:
        """The answer kept for ``question``, until ``ttl`` seconds after it came; else None."""
        kept = self._kept.get(question)
        if kept is not None and kept[0] > now:
            return kept[1]
        return None

    def waiting(self, question: bytes) -> Waiter | None:
        """What a ``question`` already on its way is waited for with; None if it is not."""
        return self._asking.get(question)

    def asking(self, question: bytes, waiter: Waiter) -> None:
        """``question`` is on its way; the same question waits for ``waiter`` meanwhile."""
        self._asking[question] = waiter

    def failed(self, question: bytes, error: BaseException) -> WebhookUnavailable:
        """``question`` got no answer (``error``): the next one asks again; the questions that
        waited for it are refused as unavailable (``cancelled`` when the asker was stopped)."""
        self._asking.pop(question, None)
        if isinstance(error, WebhookUnavailable):
            return error
        return WebhookUnavailable("cancelled")

    def answered(self, question: bytes, answer: Identity | AuthError, now: float) -> None:
        """``question`` got ``answer`` at ``now``: kept, the oldest dropped beyond ``size``."""
        self._asking.pop(question, None)
        if self.ttl > 0 and self.size > 0:
            kept = self._kept
            kept[question] = (now + self.ttl, answer)
            kept.move_to_end(question)
            while len(kept) > self.size:
                kept.popitem(last=False)
