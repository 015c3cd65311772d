"""TURN credentials handed out (docs/operations/turn.md): ``GET /turn-credentials``, and the
ICE servers the Signal-Fire welcome and the rooms demo's configuration carry.

The credentials, and what each answer holds, are ``core/turn.py``'s (``TurnOffer``); this module
reads the clock, asks who a request is for and writes the answers.

Authentication is a seam, not done here: ``TurnCredentials.identify`` is awaited with each
``GET /turn-credentials`` request and answers the user the credential is for, or None for an
anonymous request (then a random opaque id stands for it, fresh each time). The auth code sets
it (``app[TURN_KEY].identify = ...``); it may refuse a request by raising an aiohttp HTTP
error (``web.HTTPUnauthorized``), which is answered with this route's CORS and ``no-store``.
The Signal-Fire hub and the rooms demo call ``at_open()``'s function with None (a random id);
once a connection has an identity, its user is what they pass instead.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import hdrs, web

from polysignal.config import Settings, TurnSettings
from polysignal.core.edge import AllowedOrigins
from polysignal.core.turn import VARY, HttpAnswer, TurnIssuer, TurnOffer
from polysignal.server.frontdoor import upgrade_from_http

TURN_PATH = "/turn-credentials"

Identify = Callable[[web.Request], Awaitable[str | None]]
"""Who a ``GET /turn-credentials`` is for: a user, None (anonymous), or raise to refuse."""


async def anonymous(request: web.Request) -> str | None:
    """The default ``identify``: every request is anonymous."""
    return None


def random_user() -> str:
    """An opaque user id for an anonymous credential (96 random bits)."""
    return secrets.token_urlsafe(12)


class TurnCredentials(TurnOffer):
    """The node's TURN credentials (``core.turn.TurnOffer``): ``issuer`` is None when TURN is
    not configured.

    ``base`` is ``ICE_SERVERS``, ``origins`` the pages that may read the route's answers
    (``ALLOWED_ORIGINS``); ``clock`` gives unix seconds (``time.time``), ``new_user`` the id
    of an anonymous user.
    """

    def __init__(
        self,
        settings: TurnSettings,
        base: tuple[dict[str, Any], ...] | None = None,
        *,
        origins: AllowedOrigins | None = None,
        clock: Callable[[], float] = time.time,
        new_user: Callable[[], str] = random_user,
    ) -> None:
        issuer = (
            TurnIssuer(
                tuple(secret.reveal() for secret in settings.turn_secret),
                settings.turn_uris,
                settings.turn_ttl,
            )
            if settings.turn_secret
            else None
        )
        super().__init__(issuer, base, origins or AllowedOrigins(), new_user)
        self.clock = clock
        # The authentication seam (module docstring): set by the auth code.
        self.identify: Identify = anonymous

    @classmethod
    def from_settings(cls, settings: Settings) -> TurnCredentials:
        server = settings.server
        return cls(
            settings.turn, server.ice_servers, origins=AllowedOrigins(server.allowed_origins)
        )

    def ice_servers_now(self, user: str | None = None) -> tuple[dict[str, Any], ...]:
        """``ICE_SERVERS`` and a TURN entry with a credential made now for ``user`` (None: a
        random id). Only while TURN is configured."""
        return self.ice_servers(user, self.clock())

    def at_open(self) -> Callable[[str | None], tuple[dict[str, Any], ...]] | None:
        """What a hub calls at each connection's opening (with its user, or None) for its ICE
        servers; None (the hubs then hand out ``ICE_SERVERS`` as they are) when TURN is not
        configured."""
        return None if self.issuer is None else self.ice_servers_now

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """``GET /turn-credentials``: 200 with a fresh credential document, 404 when TURN is not
        configured, 403 for a page ``ALLOWED_ORIGINS`` does not list. A WebSocket asked for
        here on a connection aiohttp kept alive is served as on any path."""
        from polysignal.server.app import DOOR_KEY, is_websocket  # app.py imports this module

        if is_websocket(request):
            return await upgrade_from_http(request.app[DOOR_KEY], request)
        origin = request.headers.get(hdrs.ORIGIN)
        refused = self.refusal(origin)
        if refused is not None:
            return _write(refused)
        try:
            user = await self.identify(request)
        except web.HTTPException as refusal:
            _headers(refusal, self.cors(origin), VARY)
            raise
        return _write(self.credentials(origin, user, self.clock()))

    async def handle_preflight(self, request: web.Request) -> web.StreamResponse:
        """CORS preflight (a page sending ``Authorization``, say)."""
        headers = request.headers
        asked = headers.get(hdrs.ACCESS_CONTROL_REQUEST_HEADERS)
        return _write(self.preflight(headers.get(hdrs.ORIGIN), asked))


def _write(answer: HttpAnswer) -> web.StreamResponse:
    if answer.document is not None:
        response: web.StreamResponse = web.json_response(answer.document, status=answer.status)
    else:
        response = web.Response(status=answer.status, text=answer.text)
    return _headers(response, answer.headers, answer.vary)


def _headers(
    response: web.StreamResponse, headers: tuple[tuple[str, str], ...], vary: tuple[str, ...]
) -> web.StreamResponse:
    for name, value in headers:
        response.headers[name] = value
    for value in vary:
        response.headers.add(hdrs.VARY, value)
    return response


TURN_KEY = web.AppKey("turn", TurnCredentials)


def add_turn_routes(app: web.Application, turn: TurnCredentials) -> None:
    """``GET /turn-credentials`` and its preflight; ``app[TURN_KEY]`` is ``turn``."""
    app[TURN_KEY] = turn
    app.router.add_get(TURN_PATH, turn.handle)
    app.router.add_route(hdrs.METH_OPTIONS, TURN_PATH, turn.handle_preflight)
