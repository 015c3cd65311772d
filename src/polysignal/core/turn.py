"""TURN credentials in coturn's ``use-auth-secret`` scheme (docs/operations/turn.md).

The scheme of the TURN REST API draft (draft-uberti-behave-turn-rest-00), which coturn
implements with ``use-auth-secret`` and ``static-auth-secret``, as nextcloud-spreed-signaling
and signalmaster use it: polysignal and the TURN server share a secret and nothing else; a
credential is

* ``username`` = ``"{expiry}:{user}"``, ``expiry`` the unix time (whole seconds) after which the
  TURN server refuses it: ``int(now) + ttl``;
* ``password`` (``credential`` in an RTCIceServer) = base64 of HMAC-SHA1(secret, username).

The TURN server recomputes the HMAC with each secret it knows, so rotation is: configure the
TURN server with the new secret beside the old one, then put the new one first in
``TURN_SECRET`` (the first signs), then drop the old one from both.

``user`` is opaque to the TURN server (coturn logs it and counts quotas by it). It must not
contain ``:``, the draft's separator: ``escape_user`` percent-escapes ``%`` and ``:`` (so
``a:b`` is ``a%3Ab`` and stays distinct from any other user), and refuses an empty user and a
username longer than STUN's USERNAME allows (RFC 8489: less than 509 bytes).

No clock is read here and nothing random is made: the caller passes ``now`` (unix seconds) and
the user, or the function that makes an anonymous user's opaque id.

``TurnOffer`` is what a node hands out: the answers of ``GET /turn-credentials`` (which pages
may read them, per ``ALLOWED_ORIGINS``; never cached) and the ICE servers of each connection,
``ICE_SERVERS`` first. ``server/turn.py`` reads the clock and writes the answers.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from polysignal.core.edge import AllowedOrigins

SEPARATOR = ":"
"""Between the expiry and the user (coturn's ``rest-api-separator`` default)."""

MAX_USERNAME_BYTES = 508
"""STUN's USERNAME attribute is "less than 509 bytes" long (RFC 8489, 14.3)."""


def escape_user(user: str) -> str:
    """``user`` without the separator: ``%`` becomes ``%25`` and ``:`` ``%3A`` (reversible, so
    two users never share a username). Refuses an empty user (``ValueError``)."""
    if not user:
        raise ValueError("a TURN user must not be empty")
    return user.replace("%", "%25").replace(SEPARATOR, "%3A")


def expiry(now: float, ttl: int) -> int:
    """The unix second a credential made at ``now`` (unix seconds) stops being valid."""
    return int(now) + ttl


def username(user: str, expires: int) -> str:
    """``"{expires}:{escaped user}"``; ``ValueError`` if it is longer than STUN allows."""
    name = f"{expires}{SEPARATOR}{escape_user(user)}"
    if len(name.encode()) > MAX_USERNAME_BYTES:
        raise ValueError(f"a TURN username must be at most {MAX_USERNAME_BYTES} bytes")
    return name


def password(secret: str, name: str) -> str:
    """base64(HMAC-SHA1(``secret``, ``name``)): what the TURN server recomputes."""
    digest = hmac.new(secret.encode(), name.encode(), hashlib.sha1).digest()
    return base64.b64encode(digest).decode("ascii")


@dataclass(frozen=True, slots=True)
class TurnCredential:
    """One credential: valid at the TURN servers of ``uris`` until ``expires``."""

    username: str
    password: str = field(repr=False)
    ttl: int
    expires: int
    uris: tuple[str, ...]

    def ice_server(self) -> dict[str, Any]:
        """The RTCIceServer entry of these TURN servers."""
        return {"urls": list(self.uris), "username": self.username, "credential": self.password}


def credentials_document(credential: TurnCredential) -> dict[str, Any]:
    """The answer of ``GET /turn-credentials``: the draft's fields (``username``,
    ``password``, ``ttl``, ``uris``) and ``iceServers``, ready for an RTCConfiguration."""
    return {
        "username": credential.username,
        "password": credential.password,
        "ttl": credential.ttl,
        "uris": list(credential.uris),
        "iceServers": [credential.ice_server()],
    }


def ice_servers(
    credential: TurnCredential, base: Sequence[dict[str, Any]] | None = None
) -> tuple[dict[str, Any], ...]:
    """The RTCIceServer list to hand a client: ``base`` (``ICE_SERVERS``), then the TURN
    entry of ``credential``."""
    return (*(base or ()), credential.ice_server())


@dataclass(frozen=True, slots=True)
class TurnIssuer:
    """Makes credentials for ``uris`` with the first of ``secrets``; the others are only
    accepted by the TURN server (rotation), never used here to sign."""

    secrets: tuple[str, ...] = field(repr=False)
    uris: tuple[str, ...]
    ttl: int

    def __post_init__(self) -> None:
        if not self.secrets or not all(self.secrets):
            raise ValueError("TURN needs at least one secret, and no empty one")
        if not self.uris:
            raise ValueError("TURN needs at least one URI")
        if self.ttl <= 0:
            raise ValueError("a TURN credential's ttl must be positive")

    def issue(self, user: str, now: float) -> TurnCredential:
        """A credential for ``user`` made at ``now`` (unix seconds), valid ``ttl`` seconds."""
        expires = expiry(now, self.ttl)
        name = username(user, expires)
        return TurnCredential(name, password(self.secrets[0], name), self.ttl, expires, self.uris)


# --- what a node hands out ---------------------------------------------------------------------

NOT_CONFIGURED = "TURN is not configured on this server (it needs TURN_SECRET and TURN_URIS)\n"
"""The text of ``GET /turn-credentials`` on a node without TURN (404)."""
ORIGIN_REFUSED = "Forbidden: origin not allowed\n"
"""The text of ``GET /turn-credentials`` from a page ``ALLOWED_ORIGINS`` does not list (403)."""
NO_STORE = (("Cache-Control", "no-store"),)
VARY = ("Origin",)
"""What every answer to a page adds to ``Vary``: it depends on the ``Origin``."""


@dataclass(frozen=True, slots=True)
class HttpAnswer:
    """An HTTP answer: ``status``, the ``headers`` it sets, the values it adds to ``Vary``, and
    a ``text`` or a JSON ``document`` (or neither)."""

    status: int
    headers: tuple[tuple[str, str], ...] = ()
    vary: tuple[str, ...] = ()
    text: str | None = None
    document: dict[str, Any] | None = None


class TurnOffer:
    """The TURN credentials a node hands out with ``issuer`` (None: TURN is not configured),
    after the ICE servers ``base`` (``ICE_SERVERS``), to the pages ``origins`` allows.
    ``new_user`` makes the opaque id of an anonymous user (random, fresh each call)."""

    def __init__(
        self,
        issuer: TurnIssuer | None,
        base: tuple[dict[str, Any], ...] | None,
        origins: AllowedOrigins,
        new_user: Callable[[], str],
    ) -> None:
        self.issuer = issuer
        self.base = base
        self.origins = origins
        self.new_user = new_user

    def user(self, user: str | None) -> str:
        """Whom a credential is for: ``user``, or a fresh anonymous id when there is none."""
        return user or self.new_user()

    def ice_servers(self, user: str | None, now: float) -> tuple[dict[str, Any], ...]:
        """``ICE_SERVERS`` and a TURN entry with a credential made at ``now`` for ``user``."""
        assert self.issuer is not None
        return ice_servers(self.issuer.issue(self.user(user), now), self.base)

    def refusal(self, origin: str | None) -> HttpAnswer | None:
        """The answer of a ``GET /turn-credentials`` from ``origin`` given before its user is
        known: 403 for a page ``ALLOWED_ORIGINS`` does not list (no CORS for it), 404 when TURN
        is not configured; None when the request is to be served."""
        if not self.origins.allows(origin):
            return HttpAnswer(403, NO_STORE, text=ORIGIN_REFUSED)
        if self.issuer is None:
            return HttpAnswer(404, self.cors(origin), VARY, text=NOT_CONFIGURED)
        return None

    def credentials(self, origin: str | None, user: str | None, now: float) -> HttpAnswer:
        """The 200 answer of a ``GET /turn-credentials``: a credential made at ``now`` for
        ``user`` (None: anonymous), as ``credentials_document`` lays it out."""
        assert self.issuer is not None
        credential = self.issuer.issue(self.user(user), now)
        return HttpAnswer(200, self.cors(origin), VARY, document=credentials_document(credential))

    def preflight(self, origin: str | None, asked: str | None) -> HttpAnswer:
        """The 204 answer of the CORS preflight (a page sending ``Authorization``, say): GET,
        with the headers ``asked`` for (``Access-Control-Request-Headers``)."""
        methods = (("Access-Control-Allow-Methods", "GET"),)
        if not asked:
            return HttpAnswer(204, methods + self.cors(origin), VARY)
        headers = (*methods, ("Access-Control-Allow-Headers", asked), *self.cors(origin))
        return HttpAnswer(204, headers, ("Access-Control-Request-Headers", *VARY))

    def cors(self, origin: str | None) -> tuple[tuple[str, str], ...]:
        """The headers every answer to a page sets (besides adding ``VARY``): an allowed
        ``origin`` echoed, and never cached (a credential is fresh per request)."""
        if origin and self.origins.allows(origin):
            return (("Access-Control-Allow-Origin", origin), *NO_STORE)
        return NO_STORE
