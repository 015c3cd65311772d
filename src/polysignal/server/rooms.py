"""Serving the rooms protocol of wrtc-signal on socket.io (docs/protocols/rooms.md).

* ``/socket.io/``: python-socketio's ``AsyncServer`` on the same aiohttp app, on its in-memory
  manager, socket.io v4 defaults (ping 25 s / timeout 20 s); what it needs beyond the libraries'
  public API is in ``server/socketio_compat.py``.
* ``POST /app``: app tokens (docs/protocols/rooms.md, "POST /app"); ``GET /demo``: the browser
  demo with a local socket.io client.

The protocol's rules are ``core/rooms.py``'s state machine; this hub is its executor. What is the
transport's business is checked before the machine sees anything: by ``server/socketio_compat.py``
(engine.io sessions per address, send queues in bytes, packets the libraries cannot decode) and by
socket.io's handlers here (the handshake token, the rate limit, the session token of every event,
the shape of its data), which then feed the machine. Its effects are carried out here: emits to
local sockets, messages to other nodes by the backend's direct delivery (docs/protocols/rooms.md,
"Many nodes"), lookups of a room's node, and the leases of room names (``backends/lease.py``).
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import orjson
import socketio
from aiohttp import hdrs, web
from aiohttp.http_exceptions import HttpProcessingError

from polysignal.backends.base import Backend, Claim
from polysignal.backends.lease import MIN_TTL, Leases
from polysignal.config import AuthSettings, RoomsSettings
from polysignal.core import rooms as core
from polysignal.core.auth import Identity
from polysignal.core.edge import AllowedOrigins
from polysignal.core.effects import ToNode
from polysignal.core.errors import BackendUnavailable
from polysignal.core.limits import AddressCounter, FailureWindow
from polysignal.logs import Throttle, elide, more
from polysignal.protocols import rooms as proto
from polysignal.protocols.rooms import ClusterMessage, ServerEvent
from polysignal.server import socketio_compat as compat
from polysignal.server.auth import Authenticator, Refused
from polysignal.server.executor import Background
from polysignal.server.node import Node

log = logging.getLogger("polysignal.rooms")

STATIC = Path(__file__).resolve().parent.parent / "static"
DEMO_DIR = STATIC / "demo"
VENDOR_CLIENT = STATIC / "vendor" / "socket.io.min.js"

CLAIM_PREFIX = "rooms/room/"

# Development defaults for ROOMS_DEV=1 when APP_SECRET/APP_PASS are unset; printed at start.
DEV_SECRET = "polysignal-dev-secret"
DEV_PASS = "polysignal-dev-pass"


@dataclass(frozen=True, slots=True)
class Shared:
    """The node-wide settings the rooms protocol uses besides its own group
    (docs/configuration.md)."""

    lease_ttl: float  # ID_LEASE_TTL: the leases of room names
    max_frame_bytes: int  # MAX_FRAME_BYTES: socket.io's maxHttpBufferSize
    send_buffer_bytes: int  # SEND_BUFFER_BYTES: bounds engine.io's send queue, in bytes
    max_connections_per_ip: int  # MAX_CONNECTIONS_PER_IP: engine.io sessions per address
    rate_limit: float  # RATE_LIMIT, events per second of one socket
    rate_burst: int  # RATE_BURST
    shutdown_timeout: float  # SHUTDOWN_TIMEOUT
    ice_servers: tuple[dict[str, Any], ...]  # ICE_SERVERS, for the demo
    # The demo's ICE servers made per request, TURN credentials included (server/turn.py);
    # None: ``ice_servers``.
    ice_at_open: Callable[[str | None], tuple[dict[str, Any], ...]] | None = None


class RoomsHub:
    """The rooms protocol on one node: socket.io in, the machine's effects out."""

    def __init__(
        self,
        settings: RoomsSettings,
        shared: Shared,
        backend: Backend,
        node_id: str,
        secret: str,
        password: str,
        stopping: Callable[[], bool] = lambda: False,
        origins: AllowedOrigins | None = None,
        auth: Authenticator | None = None,
    ) -> None:
        self.settings = settings
        self.auth = auth or Authenticator(AuthSettings())
        self.shared = shared
        self.backend = backend
        self.node_id = node_id
        # engine.io sessions per client address, from the handshake on (whatever the front door
        # counts of TCP connections): long-polling sessions need no connection of their own.
        self.sessions = AddressCounter(shared.max_connections_per_ip)
        self.secret = secret.encode()
        self.password = password
        self.stopping = stopping
        self.limits = proto.Limits(
            max_payload_bytes=settings.max_payload_bytes,
            max_room_length=settings.rooms_max_name_length,
        )
        self.machine = core.RoomsMachine(
            node_id,
            core.RoomLimits(
                rooms_per_socket=settings.rooms_max_per_socket,
                pending_per_room=settings.rooms_max_pending,
                pending_per_socket=settings.rooms_max_pending_per_socket,
                name_length=settings.rooms_max_name_length,
            ),
        )
        self.gate = core.Gate(
            self.machine,
            self.secret,
            self.limits,
            token_lifetime=settings.token_lifetime,
            rate=shared.rate_limit,
            burst=shared.rate_burst,
        )
        self.conns = self.gate.members  # the sockets let in, by sid
        self.leases = Leases(backend, max(float(shared.lease_ttl), MIN_TTL))
        self.background = Background(log)
        self._throttle = Throttle()
        self.app_failures = PasswordFailures(settings.app_max_failures, settings.app_failure_window)
        self.sio = compat.BoundedServer(
            max_queued_bytes=shared.send_buffer_bytes,
            sessions=self.sessions,
            async_mode="aiohttp",
            # Events of one socket are handled in order (SDP before its ICE candidates).
            async_handlers=False,
            # ALLOWED_ORIGINS: only a listed origin is echoed (with credentials) once it is set.
            cors_allowed_origins=(origins or AllowedOrigins()).for_engineio(),
            max_http_buffer_size=shared.max_frame_bytes,
            logger=False,
            engineio_logger=False,
        )
        self.sio.on("connect", self.on_connect)
        self.sio.on("disconnect", self.on_disconnect)
        self.sio.on("*", self.on_event)
        backend.on_direct(core.DIRECT_KIND, self.on_cluster)

    async def stop(self) -> None:
        """Close every socket.io connection (clients reconnect elsewhere), then stop the tasks.

        WebSockets are closed with 1001, as every protocol's (docs/architecture.md, graceful
        shutdown): socket.io clients see a transport close and reconnect, to another node behind
        a load balancer. Their ``disconnect`` handlers (leaves, owner handovers) run while the
        backend is still up.
        """
        grace = self.shared.shutdown_timeout
        await compat.close_websockets(self.sio, grace)
        await self.background.settle(grace)
        await self.leases.close()
        await self.sio.shutdown()

    # --- carrying out the machine's effects ---
    async def feed(self, event: core.Event) -> None:
        await self.run(self.machine.handle(event))

    async def run(self, effects: list[core.Effect]) -> None:
        for effect in effects:
            match effect:
                case core.Emit():
                    to = effect.to[0] if len(effect.to) == 1 else list(effect.to)
                    await self.sio.emit(effect.event.value, effect.body, to=to)
                case ToNode():
                    await self._to_node(effect)
                case core.ToOwner():
                    await self._to_owner(effect.message)
                case core.ClaimName():
                    await self._claim(effect.room, effect.token)
                case core.ReleaseName():
                    lease = self.leases.get(CLAIM_PREFIX + effect.room)
                    if lease is not None and lease.token == effect.token:
                        await self.leases.release(lease)
                case core.HandOffName():
                    lease = self.leases.get(CLAIM_PREFIX + effect.room)
                    if lease is not None and lease.token == effect.token:
                        self.leases.forget(lease)
                case core.Warn():
                    log.warning("%s", effect.message)

    async def _to_node(self, effect: ToNode) -> None:
        try:
            sent: bool | None = await self.backend.send_direct(
                effect.node, effect.kind, effect.payload
            )
        except BackendUnavailable as exc:
            self._unreachable(exc)
            sent = None
        if not sent:
            msg = proto.decode_cluster(effect.payload)
            await self.feed(core.Undeliverable(msg, unreachable=sent is None))

    async def _to_owner(self, msg: ClusterMessage) -> None:
        """``msg`` to the node holding its room's name (core/rooms.py, ``ToOwner``)."""
        try:
            claim = await self.backend.lookup(CLAIM_PREFIX + msg.room)
        except BackendUnavailable as exc:
            self._unreachable(exc)
            await self.feed(core.Undeliverable(msg, unreachable=True))
            return
        if claim is None or (msg.token and msg.token != claim.token):
            await self.feed(core.Undeliverable(msg))
            return
        msg = replace(msg, token=claim.token)
        if claim.node_id == self.node_id:
            await self.feed(core.FromNode(self.node_id, msg))
            return
        await self._to_node(ToNode(claim.node_id, core.DIRECT_KIND, proto.encode_cluster(msg)))

    async def _claim(self, room: str, token: str) -> None:
        lost = functools.partial(self._name_lost, room, token)
        lease = await self.leases.claim(CLAIM_PREFIX + room, token, on_lost=lost)
        if lease is None:
            result = core.ClaimResult.TAKEN
        elif lease.held:
            result = core.ClaimResult.CLAIMED
        else:
            self._unreachable(f"room {room!r} claimed here only")
            result = core.ClaimResult.UNREACHABLE
        await self.feed(core.ClaimAnswer(room, token, result))

    def _name_lost(self, room: str, token: str, holder: Claim | None) -> None:
        """A lease renewal found the room's name held by another holder (``backends/lease.py``
        has logged it): the machine tells the room's owner."""
        effects = self.machine.handle(core.NameLost(room, token))
        if effects:
            self.background.run(self.run(effects))

    def _unreachable(self, why: object) -> None:
        held = self._throttle.allow("unreachable")
        if held is not None:
            log.warning("the cluster's shared state is unreachable: %s%s", why, more(held))

    # --- socket.io ---
    async def on_connect(self, sid: str, environ: dict[str, Any], auth: Any) -> None:
        if self.stopping():
            raise socketio.exceptions.ConnectionRefusedError("server shutting down")
        refusal = self.gate.refusal(auth, time.time())
        if refusal is not None:
            raise socketio.exceptions.ConnectionRefusedError(refusal)
        address = compat.remote_address(environ)
        identity = None
        if self.auth.required("rooms"):
            identity = await self._authenticate(environ, address)
        self.gate.connected(sid, address, time.monotonic(), identity)
        log.debug("socket %s connected from %s", sid, address)

    async def _authenticate(self, environ: dict[str, Any], address: str) -> Identity:
        """The identity of a connecting socket's token (its URL's ``token``, its
        ``Authorization`` or its cookie: socket.io's own ``auth`` carries the rooms token)."""
        auth = self.auth
        token, described = auth.describe(
            environ.get("PATH_INFO", ""),
            environ.get("QUERY_STRING", ""),
            environ.get("HTTP_ORIGIN"),
            address,
            environ.get("HTTP_AUTHORIZATION"),
            environ.get("HTTP_COOKIE"),
        )
        try:
            checked = auth.check("rooms", described, token)
            return checked if isinstance(checked, Identity) else await checked
        except Refused as exc:
            raise socketio.exceptions.ConnectionRefusedError(exc.message) from None

    async def on_disconnect(self, sid: str, reason: Any = None) -> None:
        log.debug("socket %s gone (%s)", sid, reason)
        try:
            effects = self.gate.disconnected(sid)
            if effects:
                await self.run(effects)
        except Exception:
            log.exception("socket %s: leaving its rooms failed", sid)

    async def on_event(self, event: Any, sid: str, *args: Any) -> None:
        """Every client event: through the gate (``core/rooms.py``: rate limit, tokens,
        validation) to the machine, and their effects carried out."""
        data = args[0] if args else None
        if log.isEnabledFor(logging.DEBUG):
            name = event if isinstance(event, str) else repr(event)
            log.debug("socket %s: %s %s", sid, name[:64], _elided(data))
        try:
            await self.run(self.gate.event(sid, event, data, time.monotonic(), time.time()))
        except Exception:
            log.exception("socket %s: error handling %s", sid, str(event)[:64])
            body = proto.error_body("internal error", str(event)[:64], proto.payload_of(data))
            await self.run([core.Emit(ServerEvent.ERROR, body, (sid,))])

    # --- other nodes ---
    async def on_cluster(self, origin: str, raw: bytes) -> None:
        # A malformed message (MalformedFrame) is dropped with a warning by the backend.
        await self.feed(core.FromNode(origin, proto.decode_cluster(raw)))

    # --- HTTP ---
    async def post_app(self, request: web.Request) -> web.Response:
        """``POST /app`` (form or JSON): ``app`` and ``password`` -> an app token
        (docs/protocols/rooms.md, "POST /app").

        Wrong passwords are counted per client address: past ``APP_MAX_FAILURES`` within
        ``APP_FAILURE_WINDOW`` the address is answered 429 with ``Retry-After`` (the seconds until
        its oldest failure leaves the window), whatever it sends. Each failure and each refusal
        is a WARNING with the address (``PasswordFailures``)."""
        failures = self.app_failures
        address = request.remote or "unknown"
        wait = failures.retry_after(address)
        if wait is not None:
            failures.log_refusal(address, wait)
            response = _api_error(429, TOO_MANY_FAILURES)
            response.headers["Retry-After"] = str(wait)
            return response
        form: Any
        try:
            if request.content_type == "application/json":
                form = await request.json(loads=orjson.loads)
            else:
                form = await request.post()
        except web.RequestPayloadError:  # its content or transfer encoding does not decode
            response = _api_error(400, "Request body is not valid JSON or form data")
            return await compat.answer_and_close(request, response)
        except (ValueError, LookupError, HttpProcessingError):
            # Not JSON, not UTF-8, an unknown charset, a multipart body without its boundary
            # or with malformed part headers: the client's error, answered, never a traceback.
            return _api_error(400, "Request body is not valid JSON or form data")
        status, body = self.gate.app_token(form, self.password)
        if status == 401:
            failures.record(address)
        return web.json_response(body, status=status)

    async def demo_page(self, request: web.Request) -> web.FileResponse:
        return web.FileResponse(DEMO_DIR / "index.html")

    async def demo_config(self, request: web.Request) -> web.Response:
        """The demo's ICE configuration, from ``ICE_SERVERS`` (none: host candidates only),
        and with TURN configured a fresh TURN credential (never cached)."""
        if self.shared.ice_at_open is None:
            return web.json_response({"iceServers": list(self.shared.ice_servers)})
        response = web.json_response({"iceServers": list(self.shared.ice_at_open(None))})
        response.headers[hdrs.CACHE_CONTROL] = "no-store"
        return response

    async def vendor_client(self, request: web.Request) -> web.FileResponse:
        return web.FileResponse(VENDOR_CLIENT)


def _elided(data: Any) -> str:
    try:
        return elide(orjson.dumps(data, default=repr))
    except TypeError:  # nested deeper than orjson goes
        return "<unsized>"


def _api_error(status: int, message: str) -> web.Response:
    status, body = core.api_error(status, message)
    return web.json_response(body, status=status)


TOO_MANY_FAILURES = core.TOO_MANY_FAILURES


class PasswordFailures:
    """The wrong passwords of ``POST /app`` per client address (``FailureWindow``, over
    ``window`` seconds; at ``limit`` of them the address waits; ``limit`` 0: never).

    Every failure is logged at WARNING with its address and its count, up to ``limit`` lines per
    10 s (then aggregated: "(N more like it)"); refusals once per 10 s with their count."""

    def __init__(
        self, limit: int, window: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.limit = limit
        self.window = window
        self.clock = clock
        self.counts = FailureWindow(limit, window, clock())
        self.failure_lines = Throttle(burst=max(limit, 1))
        self.refusal_lines = Throttle()

    def retry_after(self, address: str) -> int | None:
        """Whole seconds until ``address`` may try again; None when it may now."""
        return self.counts.retry_after(address, self.clock())

    def record(self, address: str) -> None:
        """A wrong password from ``address``: counted (when limited) and logged."""
        count = self.counts.record(address, self.clock())
        held = self.failure_lines.allow("wrong")
        if held is None:
            return
        of = f" ({count} of {self.limit} within {self.window:g}s)" if count else ""
        log.warning("POST /app: wrong password%s%s", of, more(held), extra={"remote": address})

    def log_refusal(self, address: str, wait: int) -> None:
        held = self.refusal_lines.allow("refused")
        if held is not None:
            log.warning(
                "POST /app refused (429, retry after %ds): %d wrong passwords within %gs%s",
                wait,
                self.limit,
                self.window,
                more(held),
                extra={"remote": address},
            )


def secrets_for(settings: RoomsSettings) -> tuple[str, str] | None:
    """APP_SECRET and APP_PASS, the printed development defaults under ROOMS_DEV, or None."""
    secret, password = settings.app_secret.reveal(), settings.app_pass.reveal()
    if secret and password:
        return secret, password
    if not settings.rooms_dev:
        return None
    log.warning(
        "ROOMS_DEV=1: rooms protocol running with DEVELOPMENT secrets (APP_SECRET=%s, "
        "APP_PASS=%s) where unset; anyone can mint tokens. Never use this in production.",
        "<set>" if secret else DEV_SECRET,
        "<set>" if password else DEV_PASS,
    )
    return secret or DEV_SECRET, password or DEV_PASS


ROOMS_KEY = web.AppKey("rooms", RoomsHub)


def setup(
    app: web.Application, node: Node, settings: RoomsSettings, shared: Shared
) -> RoomsHub | None:
    """Mount ``/socket.io/``, ``POST /app`` and ``/demo``; off without secrets
    (docs/protocols/rooms.md)."""
    secrets = secrets_for(settings)
    if secrets is None:
        log.warning(
            "rooms protocol (socket.io, POST /app, /demo) NOT started: APP_SECRET and APP_PASS "
            "are unset. Set both to enable it, or ROOMS_DEV=1 for development secrets. "
            "The other protocols keep running."
        )
        return None
    hub = RoomsHub(
        settings,
        shared,
        node.backend,
        node.node_id,
        *secrets,
        stopping=lambda: node.stopping,
        origins=AllowedOrigins(node.settings.server.allowed_origins),
        auth=node.auth,
    )
    app[ROOMS_KEY] = hub
    hub.sio.attach(app, socketio_path="socket.io")
    node.http_prefixes += ("/socket.io/",)  # its WebSockets too stay with aiohttp
    app.router.add_post("/app", hub.post_app)
    app.router.add_get("/demo", hub.demo_page)
    app.router.add_get("/demo/config.json", hub.demo_config)
    app.router.add_static("/demo/", DEMO_DIR, show_index=False)
    app.router.add_get("/vendor/socket.io.min.js", hub.vendor_client)
    node.shutdown_hooks.append(hub.stop)
    return hub
