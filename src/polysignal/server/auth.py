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

What checks it: a JWT verifier, at once, on the event loop (a signature check takes
microseconds), or the operator's connect webhook, asked with a POST in a task: it has
``AUTH_WEBHOOK_TIMEOUT`` seconds, its answers are cached (``AUTH_WEBHOOK_CACHE_SECONDS``, at most
``AUTH_WEBHOOK_CACHE_SIZE`` of them), the same question asked while one is in flight waits for
that answer, and any failure (timeout, connection refused, a status other than 200, an answer
that is not JSON with ``"allow": true``) denies: it fails closed.

Refusals are HTTP answers to the upgrade (401 without a valid token, 403 for an id the token does
not allow, 503 when the webhook cannot be asked), logged once per interval without the token.

Every decision is ``core/auth.py``'s (``Gate``, ``webhook_answer``, ``WebhookAnswers``); this
module reads the clock, asks the webhook over HTTP, makes the futures the same question waits on
meanwhile, and logs each refusal.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Mapping
from typing import Any

import aiohttp
from aiohttp import web

from polysignal.config import AuthSettings, jwt_verifier, redact_url
from polysignal.core.auth import (
    MAX_WEBHOOK_ANSWER,
    AuthError,
    Gate,
    Identity,
    Refused,
    WebhookAnswers,
    WebhookUnavailable,
    granted,
    query_without_token,
    split_token_path,
    token_of,
    webhook_answer,
    webhook_question,
    webhook_unavailable,
)
from polysignal.logs import CLIENT_KEY, Throttle, more

__all__ = [
    "Authenticator",
    "Refused",
    "Webhook",
    "WebhookUnavailable",
    "query_without_token",
    "split_token_path",
    "token_of",
]

log = logging.getLogger("polysignal.auth")


class Authenticator(Gate):
    """Checks the tokens of the protocols ``AUTH`` names: ``core.auth.Gate``'s checks, the
    webhook asked when there is no JWT key, and each refusal logged."""

    def __init__(self, settings: AuthSettings) -> None:
        has_key = bool(settings.auth_jwt_key) or settings.auth_jwt_key_file is not None
        super().__init__(
            settings.auth, settings.auth_cookie, jwt_verifier(settings) if has_key else None
        )
        self.settings = settings
        self.webhook = Webhook(settings) if settings.auth_webhook_url else None
        self.throttle = Throttle()

    def check(
        self, protocol: str, request: Mapping[str, Any], token: str | None
    ) -> Identity | Awaitable[Identity]:
        """The identity ``token`` proves for a ``protocol`` connection described by
        ``request`` (``path``, ``query``, ``origin``, ``address``): at once with a JWT key, an
        awaitable with the webhook. Raises (or the awaitable raises) ``Refused``."""
        if self.verifier is None:
            return self._ask(protocol, request, token)
        checked = self.verify(token, time.time())
        if isinstance(checked, Refused):
            raise self._logged(protocol, request, checked)
        return checked

    async def _ask(self, protocol: str, request: Mapping[str, Any], token: str | None) -> Identity:
        assert self.webhook is not None
        try:
            return await self.webhook.ask(webhook_question(protocol, request, token))
        except (AuthError, WebhookUnavailable) as exc:
            raise self._logged(protocol, request, self.webhook_refusal(exc)) from None

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
        refused = self.refuse_id(identity, peer_id)
        if refused is not None:
            raise self._logged(protocol, request, refused)

    def _logged(self, protocol: str, request: Mapping[str, Any], refused: Refused) -> Refused:
        """``refused``, once its log line is written (at most one per interval per status)."""
        held = self.throttle.allow(refused.status)
        if held is not None:
            log.info(
                "%s: refused %s on %s (%d): %s%s%s",
                protocol,
                request.get("address", "?"),
                str(request.get("path", "?"))[:100],
                refused.status,
                refused.message,
                f" ({refused.detail})" if refused.detail else "",
                more(held),
            )
        return refused

    async def close(self) -> None:
        if self.webhook is not None:
            await self.webhook.close()


class Webhook:
    """The operator's connect webhook: POSTs a question (``core.auth.webhook_question``) and
    reads the answer; the answers are kept and shared by ``core.auth.WebhookAnswers``."""

    def __init__(self, settings: AuthSettings) -> None:
        assert settings.auth_webhook_url is not None
        self.url = settings.auth_webhook_url
        self.timeout = settings.auth_webhook_timeout
        self.answers: WebhookAnswers[asyncio.Future[Identity | AuthError]] = WebhookAnswers(
            settings.auth_webhook_cache_seconds, settings.auth_webhook_cache_size
        )
        self.asked = 0  # requests made (the rest were answered from the cache or joined)
        self._session: aiohttp.ClientSession | None = None

    async def ask(self, question: bytes) -> Identity:
        """The identity the webhook grants for ``question``; AuthError (denied) or
        WebhookUnavailable."""
        answers = self.answers
        cached = answers.cached(question, time.monotonic())
        if cached is not None:
            return granted(cached)
        waiting = answers.waiting(question)
        if waiting is not None:
            return granted(await asyncio.shield(waiting))
        future: asyncio.Future[Identity | AuthError] = asyncio.get_running_loop().create_future()
        answers.asking(question, future)
        try:
            answer = await self._post(question)
        except BaseException as exc:  # joined waiters get a denial too, never a hang
            future.set_exception(answers.failed(question, exc))
            future.exception()  # retrieved here: only the joined waiters re-raise it
            raise
        answers.answered(question, answer, time.monotonic())
        future.set_result(answer)
        return granted(answer)

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
            raise webhook_unavailable(redact_url(self.url), exc) from None
        return webhook_answer(status, raw)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
