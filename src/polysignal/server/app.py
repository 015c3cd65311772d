"""One node's composition: its protocols on the driver, and the aiohttp app for plain HTTP.

Every request enters through the front door (``server/frontdoor.py``); the routes are the
README's "HTTP and WebSocket routes" table:

* WebSocket offering ``Signal-Fire@3``/``@2`` (any path), or any on ``/signal-fire``: Signal-Fire
* WebSocket on ``/peerjs`` (``{PEERJS_PATH}peerjs``): PeerJS
* WebSocket on ``/introduction/{id}`` or ``/connection/{a}/{b}/{key}``: relay
* any other WebSocket (outside ``/socket.io/``): topics
* ``/socket.io/``, ``POST /app``, ``GET /demo``: rooms, on aiohttp and python-socketio
* plain ``GET {PEERJS_PATH}``, ``{PEERJS_PATH}{key}/id``, ``{PEERJS_PATH}{key}/peers``: PeerJS
* ``GET /turn-credentials``: TURN credentials (``server/turn.py``), 404 without TURN
* ``GET /readyz``: 200 when the backend is usable, else 503
* ``GET /metrics`` (Prometheus, from ``METRICS_ALLOW``) and ``GET /stats`` (JSON, behind
  ``ADMIN_TOKEN`` or from loopback): ``server/metrics.py``; also on ``METRICS_PORT`` when set
* plain ``GET /`` (when ``PEERJS_PATH`` is elsewhere): 426 Upgrade Required; any other plain
  GET: ``200 okay`` (health)

WebSocket routes are tried in that order (subprotocol before path); the topics protocol takes
what no other claims. The same routes answer a WebSocket that reaches aiohttp on a connection it
kept alive (``upgrade_from_http``).
"""

from __future__ import annotations

import logging

import orjson
from aiohttp import hdrs, web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.typedefs import Handler

from polysignal.backends import Backend, create_backend
from polysignal.config import Settings
from polysignal.logs import Throttle, more
from polysignal.protocols.peerjs import SERVER_INFO
from polysignal.server import rooms
from polysignal.server.drain import draining
from polysignal.server.driver import Driver
from polysignal.server.frontdoor import FrontDoor, Served, client_address, upgrade_from_http
from polysignal.server.metrics import Metrics
from polysignal.server.node import Node
from polysignal.server.peerjs import PeerJsHub
from polysignal.server.relay import RelayHub
from polysignal.server.signalfire import CLIENT_SCRIPT, CLIENT_SCRIPT_PATH, SignalFireHub
from polysignal.server.topics import TopicsHub
from polysignal.server.turn import TurnCredentials, add_turn_routes

log = logging.getLogger("polysignal.server")

NODE_KEY = web.AppKey("node", Node)
DOOR_KEY = web.AppKey("door", FrontDoor)
TOPICS_KEY = web.AppKey("topics", TopicsHub)
RELAY_KEY = web.AppKey("relay", RelayHub)
SIGNALFIRE_KEY = web.AppKey("signalfire", SignalFireHub)
PEERJS_KEY = web.AppKey("peerjs", PeerJsHub)
METRICS_KEY = web.AppKey("metrics", Metrics)
METRICS_SERVER_KEY = web.AppKey("metrics_server", web.AppRunner)


class MalformedRequests(logging.Filter):
    """On aiohttp's server logger: a request aiohttp could not parse (a bad chunked body, a bad
    request line on a kept-alive connection, ...) is the client's error, answered 400 by
    aiohttp. It leaves one INFO line per interval (``polysignal.http``), not an ERROR traceback
    per request."""

    def __init__(self) -> None:
        super().__init__()
        self.throttle = Throttle()

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if not isinstance(exc, HttpProcessingError):
            return True
        held = self.throttle.allow("malformed")
        if held is not None:
            http_log.info(
                "malformed HTTP request (%s): answered %d%s",
                (exc.message or type(exc).__name__).splitlines()[0][:200],
                exc.code,
                more(held),
            )
        return False


http_log = logging.getLogger("polysignal.http")
MALFORMED_REQUESTS = MalformedRequests()


def create_app(settings: Settings, backend: Backend | None = None) -> web.Application:
    """Build one node: its protocols and the aiohttp app behind its front door. The backend
    starts and stops with the app (``server/runner.py`` serves it)."""
    server_log = logging.getLogger("aiohttp.server")
    if MALFORMED_REQUESTS not in server_log.filters:
        server_log.addFilter(MALFORMED_REQUESTS)
    node = Node(settings, backend if backend is not None else create_backend(settings))
    app = http_app(node, max(settings.limits.max_frame_bytes, 1 << 20))
    turn = TurnCredentials.from_settings(settings)
    turn.identify = node.auth.identify_http  # anonymous unless AUTH names a protocol
    signalfire = app[SIGNALFIRE_KEY] = SignalFireHub(
        settings.signalfire,
        node.backend,
        node.node_id,
        id_lease_ttl=settings.server.id_lease_ttl,
        ice_servers=settings.server.ice_servers,
        ice_at_open=turn.at_open(),
    )
    peerjs = app[PEERJS_KEY] = PeerJsHub(
        settings.peerjs, node.backend, node.node_id, id_lease_ttl=settings.server.id_lease_ttl
    )
    relay = app[RELAY_KEY] = RelayHub(
        settings.relay,
        node.backend,
        node.node_id,
        lease_ttl=settings.server.id_lease_ttl,
        send_buffer_bytes=settings.limits.send_buffer_bytes,
    )
    topics = app[TOPICS_KEY] = TopicsHub(node)
    node.add_route(signalfire.matches, Driver(signalfire, node))
    node.add_route(peerjs.matches, Driver(peerjs, node))
    node.add_route(relay.matches, Driver(relay, node))
    node.fallback = Driver(topics, node)
    node.shutdown_hooks.append(signalfire.stop)
    node.shutdown_hooks.append(peerjs.stop)
    node.shutdown_hooks.append(relay.stop)
    app.router.add_get(CLIENT_SCRIPT_PATH, _client_script)
    add_peerjs_routes(app, peerjs)
    rooms.setup(
        app,
        node,
        settings.rooms,
        rooms.Shared(
            lease_ttl=settings.server.id_lease_ttl,
            max_frame_bytes=settings.limits.max_frame_bytes,
            send_buffer_bytes=settings.limits.send_buffer_bytes,
            max_connections_per_ip=settings.limits.max_connections_per_ip,
            rate_limit=settings.limits.rate_limit,
            rate_burst=settings.limits.rate_burst,
            shutdown_timeout=settings.server.shutdown_timeout,
            ice_servers=settings.server.ice_servers or (),
            ice_at_open=turn.at_open(),
        ),
    )
    add_turn_routes(app, turn)
    add_metrics_routes(app, node)
    add_health_routes(app)
    return app


def add_metrics_routes(app: web.Application, node: Node) -> Metrics:
    """``/metrics`` and ``/stats`` on the node's port, and on ``METRICS_PORT`` when set."""
    metrics = app[METRICS_KEY] = Metrics(node, lambda: app.get(rooms.ROOMS_KEY))
    app.router.add_get("/metrics", metrics.metrics)
    app.router.add_get("/stats", metrics.stats)
    app.on_startup.append(_start_metrics)
    app.on_cleanup.append(_stop_metrics)
    return metrics


async def _start_metrics(app: web.Application) -> None:
    metrics = app[METRICS_KEY]
    metrics.start()
    server = metrics.node.settings.server
    if not server.metrics_port:
        return
    side = web.Application()
    side.router.add_get("/metrics", metrics.metrics)
    side.router.add_get("/stats", metrics.stats)
    runner = web.AppRunner(side, handle_signals=False, access_log=None)
    await runner.setup()
    # Workers share the port as they share the main one; any of them answers for all.
    site = web.TCPSite(
        runner, server.host, server.metrics_port, reuse_port=metrics.directory is not None or None
    )
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise OSError(exc.errno, f"METRICS_PORT {server.metrics_port}: {exc.strerror}") from None
    app[METRICS_SERVER_KEY] = runner
    log.info("metrics on http://%s:%d/metrics", server.host, server.metrics_port)


async def _stop_metrics(app: web.Application) -> None:
    runner = app.get(METRICS_SERVER_KEY)
    if runner is not None:
        await runner.cleanup()
    await app[METRICS_KEY].stop()


def http_app(node: Node, client_max_size: int = 1 << 20) -> web.Application:
    """The aiohttp app of ``node``, with its front door, the backend's start and stop, and the
    closing of every connection at shutdown. Routes are added by the caller."""
    app = web.Application(
        client_max_size=client_max_size, middlewares=[client_address, request_clock]
    )
    app[NODE_KEY] = node
    app[DOOR_KEY] = FrontDoor(node)
    app.on_startup.append(_start_backend)
    app.on_shutdown.append(_close_connections)
    app.on_cleanup.append(_close_backend)
    return app


@web.middleware
async def request_clock(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Tell the front door when a request's headers are in and when it is done, so it times
    each later request's headers on a connection aiohttp keeps alive (``Served``)."""
    transport = request.transport
    served = transport.get_protocol() if transport is not None else None
    if not isinstance(served, Served):
        return await handler(request)
    served.request_started()
    try:
        return await handler(request)
    finally:
        served.request_done()


def add_peerjs_routes(app: web.Application, hub: PeerJsHub) -> None:
    """PeerJS's plain HTTP routes under ``PEERJS_PATH`` (docs/protocols/peerjs.md), each with
    CORS and its preflight. A WebSocket upgrade that reaches one of them (on a connection
    aiohttp kept alive) is served by the node's WebSocket routes, as on any path."""
    prefix = hub.prefix
    routes: list[tuple[str, Handler]] = [(prefix, _peerjs_info)]
    if prefix != "/":
        routes.append((prefix.rstrip("/"), _peerjs_info))
    routes += [(prefix + "{key}/id", _peerjs_id), (prefix + "{key}/peers", _peerjs_peers)]
    for path, handler in routes:
        app.router.add_get(path, _or_websocket(handler))
        app.router.add_route(hdrs.METH_OPTIONS, path, _peerjs_preflight)


def _or_websocket(handler: Handler) -> Handler:
    async def route(request: web.Request) -> web.StreamResponse:
        if is_websocket(request):
            return await upgrade_from_http(request.app[DOOR_KEY], request)
        return _cors(request, await handler(request))

    return route


def _cors(request: web.Request, response: web.StreamResponse) -> web.StreamResponse:
    """CORS as the original's ``cors`` package: the allowed origin echoed, ``Vary: Origin``.
    The origins are ``PEERJS_CORS_ORIGINS``'s, else ``ALLOWED_ORIGINS``'s (any, by default)."""
    hub = request.app[PEERJS_KEY]
    asked = request.headers.get(hdrs.ORIGIN)
    if hub.settings.peerjs_cors_origins:
        origin = hub.allowed_origin(asked)
    else:
        origin = asked if asked and request.app[DOOR_KEY].origins.allows(asked) else None
    if origin is not None:
        response.headers[hdrs.ACCESS_CONTROL_ALLOW_ORIGIN] = origin
    response.headers.add(hdrs.VARY, hdrs.ORIGIN)
    return response


async def _peerjs_preflight(request: web.Request) -> web.StreamResponse:
    response = web.Response(status=204)
    response.headers[hdrs.ACCESS_CONTROL_ALLOW_METHODS] = "GET,HEAD,PUT,PATCH,POST,DELETE"
    asked = request.headers.get(hdrs.ACCESS_CONTROL_REQUEST_HEADERS)
    if asked:
        response.headers[hdrs.ACCESS_CONTROL_ALLOW_HEADERS] = asked
        response.headers.add(hdrs.VARY, hdrs.ACCESS_CONTROL_REQUEST_HEADERS)
    return _cors(request, response)


async def _peerjs_info(request: web.Request) -> web.StreamResponse:
    return web.json_response(SERVER_INFO, dumps=_compact)


async def _peerjs_id(request: web.Request) -> web.StreamResponse:
    return web.Response(text=request.app[PEERJS_KEY].new_id(), content_type="text/html")


async def _peerjs_peers(request: web.Request) -> web.StreamResponse:
    hub = request.app[PEERJS_KEY]
    if not hub.settings.peerjs_allow_discovery:
        return web.Response(status=401, text="Unauthorized", content_type="text/plain")
    return web.json_response(await hub.peers(), dumps=_compact)


def _compact(value: object) -> str:
    """JSON as the original's ``res.send`` writes it (``JSON.stringify``: no spaces)."""
    return orjson.dumps(value).decode()


def add_health_routes(app: web.Application) -> None:
    """``/readyz``, ``/healthz``, and the catch-all: a WebSocket that reached aiohttp is served
    by the node's protocols, a plain GET on ``/`` is 426 (unless PeerJS is mounted there), any
    other plain GET is health."""
    app.router.add_get("/readyz", _readyz)
    app.router.add_get("/healthz", _healthz)
    # Registered last so every protocol's own routes win.
    app.router.add_route(hdrs.METH_GET, "/{tail:.*}", _dispatch)
    app.router.add_route(hdrs.METH_HEAD, "/{tail:.*}", _dispatch)


def is_websocket(request: web.Request) -> bool:
    return (
        request.headers.get(hdrs.UPGRADE, "").lower() == "websocket"
        and "upgrade" in request.headers.get(hdrs.CONNECTION, "").lower()
    )


async def _dispatch(request: web.Request) -> web.StreamResponse:
    if is_websocket(request):
        return await upgrade_from_http(request.app[DOOR_KEY], request)
    if request.path == "/":
        # Flow-Like answers a plain GET on the WebSocket path with 426 (docs/protocols/topics.md).
        raise web.HTTPUpgradeRequired(
            headers={hdrs.UPGRADE: "websocket"}, text="Upgrade Required: connect a WebSocket"
        )
    return await _healthz(request)


async def _healthz(request: web.Request) -> web.Response:
    return web.Response(text="okay", content_type="text/plain")


async def _readyz(request: web.Request) -> web.Response:
    """200 while the node takes new clients; 503 while its backend is unusable, from the start
    of a drain (``server/drain.py``: it still serves meanwhile) and while it stops."""
    node = request.app[NODE_KEY]
    if draining(request.app):
        return web.Response(status=503, text="draining", content_type="text/plain")
    if node.backend.ready and not node.stopping:
        return web.Response(text="ready", content_type="text/plain")
    return web.Response(status=503, text="not ready", content_type="text/plain")


async def _client_script(request: web.Request) -> web.StreamResponse:
    """The Signal-Fire browser client, an ES module with no build step."""
    return web.FileResponse(
        CLIENT_SCRIPT,
        headers={
            hdrs.CONTENT_TYPE: "text/javascript; charset=utf-8",
            hdrs.CACHE_CONTROL: "no-cache",
        },
    )


async def _start_backend(app: web.Application) -> None:
    node = app[NODE_KEY]
    await node.backend.start()
    log.info("node %s up on backend %s", node.node_id, node.settings.backend_scheme)


async def _close_connections(app: web.Application) -> None:
    node = app[NODE_KEY]
    node.stopping = True
    await node.close_connections(node.settings.server.shutdown_timeout)
    for hook in node.shutdown_hooks:
        try:
            await hook()
        except Exception:
            log.exception("shutdown hook failed")


async def _close_backend(app: web.Application) -> None:
    await app[NODE_KEY].backend.close()
