"""The aiohttp application: one port, every protocol (DESIGN.md §1).

* WebSocket offering `Signal-Fire@3`/`@2` (any path), or any on `/signal-fire`: Signal-Fire
* WebSocket on `/introduction/{id}` or `/connection/{a}/{b}/{key}`: relay
* `/socket.io/`, `POST /app`, `GET /demo`: rooms
* any other WebSocket: topics
* `GET /readyz`: 200 when the backend is usable, else 503
* plain `GET /`: 426 Upgrade Required; any other plain GET: `200 okay` (health)

Each protocol module has ``setup(app, node)``, which adds its HTTP routes and WebSocket matchers;
WebSocket matchers are tried in the order of ``PROTOCOLS`` (subprotocol routing before paths).
"""

from __future__ import annotations

import logging

from aiohttp import hdrs, web

from polysignal.backends import Backend, create_backend
from polysignal.config import Settings
from polysignal.server import relay, rooms, signalfire, topics
from polysignal.server.node import Node

log = logging.getLogger("polysignal.server")

NODE_KEY = web.AppKey("node", Node)
TOPICS_KEY = web.AppKey("topics", topics.TopicsHub)


def create_app(settings: Settings, backend: Backend | None = None) -> web.Application:
    """Build the application of one node; the backend starts and stops with the app."""
    node = Node(settings, backend if backend is not None else create_backend(settings))
    app = web.Application(client_max_size=max(settings.max_frame_bytes, 1 << 20))
    app[NODE_KEY] = node
    app[TOPICS_KEY] = topics.setup(app, node)
    # `/` first: most connections arrive there, and a plain route resolves before any pattern.
    app.router.add_get("/", _dispatch)
    # The other protocols register their HTTP routes and WebSocket matchers here, in matching
    # order: Signal-Fire (by subprotocol, any path) first, then the relay paths, then rooms.
    signalfire.setup(app, node)
    relay.setup(app, node)
    rooms.setup(app, node)

    app.router.add_get("/readyz", _readyz)
    app.router.add_get("/healthz", _healthz)
    # Registered last so every protocol's own routes win.
    app.router.add_route(hdrs.METH_GET, "/{tail:.*}", _dispatch)
    app.router.add_route(hdrs.METH_HEAD, "/{tail:.*}", _dispatch)

    app.on_startup.append(_start_backend)
    app.on_shutdown.append(_close_connections)
    app.on_cleanup.append(_close_backend)
    return app


def is_websocket(request: web.Request) -> bool:
    return (
        request.headers.get(hdrs.UPGRADE, "").lower() == "websocket"
        and "upgrade" in request.headers.get(hdrs.CONNECTION, "").lower()
    )


async def _dispatch(request: web.Request) -> web.StreamResponse:
    node = request.app[NODE_KEY]
    if is_websocket(request):
        for matches, handler in node.ws_routes:
            if matches(request):
                return await handler(request)
        return await request.app[TOPICS_KEY].handle(request)
    if request.path == "/":
        # Flow-Like answers a plain GET on the WebSocket path with 426 (PROTOCOLS.md §1.2).
        raise web.HTTPUpgradeRequired(
            headers={hdrs.UPGRADE: "websocket"}, text="Upgrade Required: connect a WebSocket"
        )
    return await _healthz(request)


async def _healthz(request: web.Request) -> web.Response:
    return web.Response(text="okay", content_type="text/plain")


async def _readyz(request: web.Request) -> web.Response:
    node = request.app[NODE_KEY]
    if node.backend.ready and not node.stopping:
        return web.Response(text="ready", content_type="text/plain")
    return web.Response(status=503, text="not ready", content_type="text/plain")


async def _start_backend(app: web.Application) -> None:
    node = app[NODE_KEY]
    await node.backend.start()
    log.info("node %s up on backend %s", node.node_id, node.settings.backend_scheme)


async def _close_connections(app: web.Application) -> None:
    node = app[NODE_KEY]
    node.stopping = True
    await node.close_connections(node.settings.shutdown_timeout)
    for hook in node.shutdown_hooks:
        try:
            await hook()
        except Exception:
            log.exception("shutdown hook failed")


async def _close_backend(app: web.Application) -> None:
    await app[NODE_KEY].backend.close()
