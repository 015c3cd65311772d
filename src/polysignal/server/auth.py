"""Authentication at the edge: every connection of a protocol named in ``AUTH`` presents a token
before any state is created for it (docs/security.md).

Where the token comes from, first found wins (``token_of``):

1. a path prefix ``/token/<token>/``, stripped before routing (for the relay clients, which
   append their own paths to the URL they are given: ``ws://host/token/<jwt>`` becomes
   ``/token/<jwt>/introduction/<peerId>``);
2. the query parameter ``token`` (y-webrtc, Signal-Fire and PeerJS clients keep the URL's query;
   PeerJS sends its ``token`` option there; socket.io clients send the URL's query);
3. ``Authorization: Bearer <token>`` (clients that set headers);
4. the cookie ``AUTH_COOKIE`` (browsers, set by the application's own login).

What checks it: a JWT verifier (``core/auth.py``), at once, on the event loop (a signature check
takes microseconds), or the operator's connect webhook, asked with a POST in a task: it has
``AUTH_WEBHOOK_TIMEOUT`` seconds, its answers are cached (``AUTH_WEBHOOK_CACHE_SECONDS``, at most
``AUTH_WEBHOOK_CACHE_SIZE`` of them), the same question asked while one is in flight waits for
that answer, and any failure (timeout, connection refused, a status other than 200, an answer
that is not JSON with ``"allow": true``) denies: it fails closed.

Refusals are HTTP answers to the upgrade (401 without a valid token, 403 for an id the token does
not allow, 503 when the webhook cannot be asked), logged once per interval without the token.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Mapping
from http.cookies import CookieError, SimpleCookie
from typing import Any
from urllib.parse import parse_qsl, urlencode

import aiohttp
import orjson
from aiohttp import web

from polysignal.config import AuthSettings, jwt_verifier, redact_url
from polysignal.core.auth import AuthError, Identity, JwtVerifier, identity_from_claims
from polysignal.logs import CLIENT_KEY, Throttle, more
from polysignal.protocols.websocket import HandshakeError

log = logging.getLogger("polysignal.auth")

TOKEN_PREFIX = "/token/"
"""The path prefix that carries a token (``/token/<token>/...``)."""

CHALLENGE = (("WWW-Authenticate", 'Bearer realm="polysignal"'),)

MAX_WEBHOOK_ANSWER = 64 * 1024
"""Largest webhook answer read, in bytes; a longer one denies."""


def split_token_path(path: str) -> tuple[str, str | None]:
    """``/token/<t>/rest`` -> (``/rest``, ``t``); any other path -> (path, None)."""
    if not path.startswith(TOKEN_PREFIX):
        return path, None
    token, slash, rest = path[len(TOKEN_PREFIX) :].partition("/")
    return slash + rest if slash else "/", token or None


def token_of(
    query: Mapping[str, str], authorization: str | None, cookie: str | None, cookie_name: str
) -> str | None:
    """The token of a request, from its query, ``Authorization`` header or cookie."""
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


class Refused(HandshakeError):
    """An authentication refusal, answered before the upgrade."""


class Authenticator:
    """Checks the tokens of the protocols ``AUTH`` names."""

    def __init__(self, settings: AuthSettings) -> None:
        self.settings = settings
        self.protocols = frozenset(settings.auth)
        self.cookie_name = settings.auth_cookie
        has_key = bool(settings.auth_jwt_key) or settings.auth_jwt_key_file is not None
        self.verifier: JwtVerifier | None = jwt_verifier(settings) if has_key else None
        self.webhook = Webhook(settings) if settings.auth_webhook_url else None
        self.throttle = Throttle()
        self.refused = 0  # refusals so far, every cause

    @property
    def on(self) -> bool:
        return bool(self.protocols)

    def required(self, protocol: str) -> bool:
        return protocol in self.protocols

    def check(
        self, protocol: str, request: Mapping[str, Any], token: str | None
    ) -> Identity | Awaitable[Identity]:
        """The identity ``token`` proves for a ``protocol`` connection described by
        ``request`` (``path``, ``query``, ``origin``, ``address``): at once with a JWT key, an
        awaitable with the webhook. Raises (or the awaitable raises) ``Refused``."""
        if self.verifier is not None:
            if token is None:
                raise self.refuse(protocol, request, 401, "authentication required: no token")
            try:
                return self.verifier.verify(token, time.time())
            except AuthError as exc:
                raise self.refuse(protocol, request, 401, f"authentication failed: {exc}") from None
        assert self.webhook is not None
        return self._ask(protocol, request, token)

    async def _ask(self, protocol: str, request: Mapping[str, Any], token: str | None) -> Identity:
        assert self.webhook is not None
        try:
            return await self.webhook.ask({"protocol": protocol, **request, "token": token})
        except AuthError as exc:
            raise self.refuse(protocol, request, 401, f"authentication refused: {exc}") from None
        except WebhookUnavailable as exc:
            raise self.refuse(
                protocol, request, 503, "authentication unavailable; try again", str(exc)
            ) from None

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
        ``Authorization`` or cookie) and its description as ``check`` takes it (what the
        webhook is asked and the refusal logs name; the query without its token)."""
        if token is None:
            token = token_of(dict(parse_qsl(query)), authorization, cookie, self.cookie_name)
        described = {
            "path": path,
            "query": query_without_token(query),
            "origin": origin,
            "address": address,
        }
        return token, described

    async def identify_http(self, request: web.Request) -> str | None:
        """The subject of a plain HTTP request's token (``GET /turn-credentials``) while any
        protocol requires authentication, else None (anonymous); raises the HTTP refusal."""
        if not self.on:
            return None
        headers = request.headers
        token, described = self.describe(
            request.path,
            request.query_string,
            headers.get("Origin"),
            request.get(CLIENT_KEY, request.remote),
            headers.get("Authorization"),
            headers.get("Cookie"),
        )
        try:
            checked = self.check("turn", described, token)
            identity = checked if isinstance(checked, Identity) else await checked
        except Refused as exc:
            status = {401: web.HTTPUnauthorized, 403: web.HTTPForbidden}.get(
                exc.status, web.HTTPServiceUnavailable
            )
            raise status(text=exc.message + "\n", headers=dict(exc.headers)) from None
        return identity.sub

    def check_id(
        self, protocol: str, request: Mapping[str, Any], identity: Identity, peer_id: str
    ) -> None:
        """Refuse (403) a connection whose ``peer_id`` its identity does not allow."""
        if not identity.may_use_id(peer_id):
            raise self.refuse(
                protocol, request, 403, f"the id {peer_id[:100]!r} is not allowed for this token"
            )

    def refuse(
        self,
        protocol: str,
        request: Mapping[str, Any],
        status: int,
        message: str,
        detail: str = "",
    ) -> Refused:
        self.refused += 1
        held = self.throttle.allow(status)
        if held is not None:
            log.info(
                "%s: refused %s on %s (%d): %s%s%s",
                protocol,
                request.get("address", "?"),
                str(request.get("path", "?"))[:100],
                status,
                message,
                f" ({detail})" if detail else "",
                more(held),
            )
        return Refused(status, message, CHALLENGE if status == 401 else ())

    async def close(self) -> None:
        if self.webhook is not None:
            await self.webhook.close()


class WebhookUnavailable(Exception):
    """The webhook could not be asked or did not answer in time."""


class Webhook:
    """The operator's connect webhook: POSTs the connection's description (protocol, path,
    query without the token, origin, client address, token) and reads the answer."""

    def __init__(self, settings: AuthSettings) -> None:
        assert settings.auth_webhook_url is not None
        self.url = settings.auth_webhook_url
        self.timeout = settings.auth_webhook_timeout
        self.ttl = settings.auth_webhook_cache_seconds
        self.size = settings.auth_webhook_cache_size
        self.cache: OrderedDict[bytes, tuple[float, Identity | AuthError]] = OrderedDict()
        self.inflight: dict[bytes, asyncio.Future[Identity | AuthError]] = {}
        self.asked = 0  # requests made (the rest were answered from the cache or joined)
        self._session: aiohttp.ClientSession | None = None

    async def ask(self, question: Mapping[str, Any]) -> Identity:
        """The identity the webhook grants for ``question``; AuthError (denied) or
        WebhookUnavailable."""
        body = orjson.dumps(question, option=orjson.OPT_SORT_KEYS)
        now = time.monotonic()
        cached = self.cache.get(body)
        if cached is not None and cached[0] > now:
            return _result(cached[1])
        waiting = self.inflight.get(body)
        if waiting is not None:
            return _result(await asyncio.shield(waiting))
        future: asyncio.Future[Identity | AuthError] = asyncio.get_running_loop().create_future()
        self.inflight[body] = future
        try:
            answer = await self._post(body)
        except BaseException as exc:  # joined waiters get a denial too, never a hang
            error = exc if isinstance(exc, WebhookUnavailable) else WebhookUnavailable("cancelled")
            future.set_exception(error)
            future.exception()  # retrieved here: only the joined waiters re-raise it
            raise
        finally:
            self.inflight.pop(body, None)
        future.set_result(answer)
        if self.ttl > 0 and self.size > 0:
            self.cache[body] = (time.monotonic() + self.ttl, answer)
            self.cache.move_to_end(body)
            while len(self.cache) > self.size:
                self.cache.popitem(last=False)
        return _result(answer)

    async def _post(self, body: bytes) -> Identity | AuthError:
        self.asked += 1
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout))
        try:
            async with self._session.post(
                self.url, data=body, headers={"Content-Type": "application/json"}
            ) as response:
                raw = await response.content.read(MAX_WEBHOOK_ANSWER + 1)
                status = response.status
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            reason = "timed out" if isinstance(exc, TimeoutError) else type(exc).__name__
            raise WebhookUnavailable(f"webhook {redact_url(self.url)}: {reason}") from None
        if status != 200:
            return AuthError(f"the webhook answered {status}")
        if len(raw) > MAX_WEBHOOK_ANSWER:
            return AuthError("the webhook's answer is too long")
        try:
            answer = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return AuthError("the webhook's answer is not JSON")
        if not isinstance(answer, dict) or answer.get("allow") is not True:
            return AuthError("denied by the webhook")
        try:
            return identity_from_claims(answer)
        except AuthError as exc:
            return AuthError(f"the webhook's answer: {exc}")

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def _result(answer: Identity | AuthError) -> Identity:
    if isinstance(answer, AuthError):
        raise AuthError(str(answer))
    return answer
