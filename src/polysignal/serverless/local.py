"""``polysignal serverless-local``: the Lambda handler behind a local WebSocket server.

Like the original's ``local.ts`` (docs/serverless.md), but the same ``SignalingHandler`` runs
unchanged: each socket event becomes the API Gateway event the Lambda would get (``$connect``,
``$default`` per frame, ``$disconnect``), subscriptions live in the DynamoDB that
``AWS_DYNAMODB_ENDPOINT`` names, and only the sender differs: frames go to this server's sockets
instead of the Management API, and a connection that is no longer here counts as ``410 Gone``.

Frames of one connection are handled one at a time, in order, on a thread pool (boto3 blocks).
As on API Gateway, a message over 128 KiB closes the socket (1009); smaller ones over
``MAX_FRAME_BYTES`` get the handler's error frame.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import secrets
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from aiohttp import web

from polysignal.backends.memory import MemoryBackend
from polysignal.config import Settings
from polysignal.core.errors import Answer, Reply
from polysignal.protocols import topics as proto
from polysignal.protocols.websocket import HandshakeError
from polysignal.server.app import add_health_routes, http_app
from polysignal.server.connection import Connection
from polysignal.server.driver import Driver, Handler, Handshake, Result
from polysignal.server.node import Node
from polysignal.server.runner import NodeServer, run_until_signalled
from polysignal.serverless.aws import dynamodb_client
from polysignal.serverless.sender import Delivery
from polysignal.serverless.service import Route, SignalingHandler
from polysignal.serverless.settings import ServerlessSettings
from polysignal.serverless.store import SubscriptionStore

log = logging.getLogger("polysignal.serverless")

DEFAULT_PORT = 4001
# API Gateway's WebSocket message limit (128 KB); it closes the connection past it.
API_GATEWAY_MAX_MESSAGE = 128 * 1024
STAGE = "local"


class LocalSender:
    """Frames to this server's own sockets; called from handler threads."""

    concurrency = 1

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.connections: dict[str, Connection] = {}

    def post(self, connection_id: str, data: bytes) -> Delivery:
        conn = self.connections.get(connection_id)
        if conn is None or conn.closing:
            return Delivery.GONE
        try:
            self.loop.call_soon_threadsafe(conn.send_text, data)
        except RuntimeError:  # the server's loop has closed: every connection is gone
            return Delivery.GONE
        return Delivery.SENT


def new_connection_id() -> str:
    """An id shaped like API Gateway's (16 URL-safe characters)."""
    return secrets.token_urlsafe(12)


def api_gateway_event(
    route: Route, connection_id: str, request: Handshake, body: str | bytes | None = None
) -> dict[str, Any]:
    """The event API Gateway sends the Lambda for ``route`` (the fields the handler reads and
    the usual others)."""
    now_ms = int(time.time() * 1000)
    event_type = {
        Route.CONNECT: "CONNECT",
        Route.DISCONNECT: "DISCONNECT",
        Route.DEFAULT: "MESSAGE",
    }[route]
    event: dict[str, Any] = {
        "requestContext": {
            "routeKey": str(route),
            "eventType": event_type,
            "connectionId": connection_id,
            "messageId": secrets.token_urlsafe(9),
            "extendedRequestId": secrets.token_urlsafe(9),
            "requestId": secrets.token_urlsafe(9),
            "apiId": STAGE,
            "stage": STAGE,
            "domainName": request.header("host") or "",
            "requestTimeEpoch": now_ms,
            "connectedAt": now_ms,
            "identity": {"sourceIp": request.address},
        },
        "isBase64Encoded": False,
    }
    if route is Route.CONNECT:
        event["headers"] = {
            name.decode("latin-1"): value.decode("latin-1") for name, value in request.headers
        }
    if isinstance(body, bytes):
        event["body"] = base64.b64encode(body).decode()
        event["isBase64Encoded"] = True
    elif body is not None:
        event["body"] = body
    return event


class LocalGateway(Handler):
    """The WebSocket side of API Gateway, for one handler: every socket event becomes the
    Lambda event it would be, handled in order per connection on a thread pool."""

    protocol = "serverless"

    def __init__(
        self,
        node: Node,
        make_handler: Callable[[LocalSender], SignalingHandler],
        threads: int = 16,
    ) -> None:
        self.node = node
        self.make_handler = make_handler
        self.executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="polysignal")
        self.sender: LocalSender | None = None
        self.handler: SignalingHandler | None = None
        self.rate_error = proto.rate_limited_error(node.settings.limits.rate_limit)

    async def start(self, app: web.Application) -> None:
        self.sender = LocalSender(asyncio.get_running_loop())
        self.handler = self.make_handler(self.sender)

    async def stop(self, app: web.Application) -> None:
        if self.handler is not None:
            self.handler.close()
        self.executor.shutdown(wait=True)

    async def invoke(self, event: dict[str, Any]) -> dict[str, Any]:
        assert self.handler is not None
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, self.handler, event, None)

    # --- the driver's callbacks ---
    def accept(self, request: Handshake) -> Result:
        return self._connect(request)

    async def _connect(self, request: Handshake) -> None:
        connection_id = request.state = new_connection_id()
        # API Gateway refuses the upgrade when $connect does not answer 2xx.
        answer = await self.invoke(api_gateway_event(Route.CONNECT, connection_id, request))
        if answer.get("statusCode") != 200:
            raise HandshakeError(403, "refused by $connect")

    def on_open(self, conn: Connection, request: Handshake) -> Result:
        assert self.sender is not None
        connection_id: str = request.state
        conn.state = (connection_id, request)
        self.sender.connections[connection_id] = conn
        return None

    def on_message(self, conn: Connection, data: bytes, binary: bool) -> Result:
        connection_id, request = conn.state
        body = data if binary else data.decode()
        return self._invoke(api_gateway_event(Route.DEFAULT, connection_id, request, body))

    def on_close(self, conn: Connection) -> Result:
        assert self.sender is not None
        connection_id, request = conn.state
        self.sender.connections.pop(connection_id, None)
        return self._invoke(api_gateway_event(Route.DISCONNECT, connection_id, request))

    async def _invoke(self, event: dict[str, Any]) -> None:
        await self.invoke(event)

    def answer(self, conn: Connection, error: Exception) -> Answer:
        return proto.answer(error)

    def rate_limited(self, conn: Connection, data: bytes, binary: bool, report: bool) -> Answer:
        return Reply(self.rate_error) if report else None


def create_local_app(
    settings: ServerlessSettings,
    server_settings: Settings | None = None,
    store: SubscriptionStore | None = None,
) -> web.Application:
    """The local API Gateway stand-in with its handler; DynamoDB as ``settings`` say."""
    server_settings = (server_settings or Settings()).replace(
        max_frame_bytes=API_GATEWAY_MAX_MESSAGE
    )
    node = Node(server_settings, MemoryBackend(server_settings.server.node_id))
    if store is None:
        store = SubscriptionStore(
            dynamodb_client(settings), settings.table_name, settings.subscription_ttl
        )
    subscriptions = store

    def make_handler(sender: LocalSender) -> SignalingHandler:
        return SignalingHandler(settings, subscriptions, lambda request: sender)

    gateway = LocalGateway(node, make_handler)
    node.fallback = Driver(gateway, node)
    app = http_app(node)
    app[GATEWAY_KEY] = gateway
    add_health_routes(app)
    app.on_startup.append(gateway.start)
    app.on_cleanup.append(gateway.stop)
    return app


GATEWAY_KEY = web.AppKey("gateway", LocalGateway)


async def serve_local(
    settings: ServerlessSettings,
    host: str,
    port: int,
    *,
    create_table: bool = False,
    server_settings: Settings | None = None,
    on_listening: Callable[[int], None] | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    """Serve until ``stop`` is set or SIGTERM/SIGINT; optionally create the table first."""
    store = SubscriptionStore(
        dynamodb_client(settings), settings.table_name, settings.subscription_ttl
    )
    if create_table:
        created = await asyncio.to_thread(store.create_table)
        log.info("table %s %s", settings.table_name, "created" if created else "already exists")
    app = create_local_app(settings, server_settings or Settings.from_env(), store)
    server = NodeServer(app)
    bound = await server.start(host, port)
    log.info(
        "serverless-local on ws://%s:%d (table %s at %s)",
        host,
        bound,
        settings.table_name,
        settings.dynamodb_endpoint or f"AWS {settings.region}",
    )
    if on_listening is not None:
        on_listening(bound)
    await run_until_signalled(server, stop)


def run_local(
    settings: ServerlessSettings,
    server_settings: Settings,
    host: str,
    port: int,
    create_table: bool,
) -> None:
    """Blocking entry point of ``polysignal serverless-local``."""
    asyncio.run(
        serve_local(
            settings, host, port, create_table=create_table, server_settings=server_settings
        )
    )
