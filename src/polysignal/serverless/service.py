"""The topics protocol as an API Gateway WebSocket handler (docs/serverless.md).

API Gateway holds the sockets and invokes the handler once per event, with the route in
``requestContext.routeKey``:

* ``$connect``: accepted (nothing is stored until a subscribe).
* ``$default``: one client frame, decoded by the topics codec (``polysignal.protocols.topics``),
  with the server's semantics: ``subscribe``/``unsubscribe`` (no reply), ``publish`` to the other
  subscribers with ``clients`` and ``_origin`` (the sender too with ``ECHO=1``), ``ping`` ->
  ``pong``, and a ``{"type":"error"}`` frame for bad input instead of the original's silent 500.
* ``$disconnect``: every subscription of the connection is deleted, found through ``gs1``.

Every ``$default`` event is activity: the connection's subscriptions whose TTL is older than
``SUBSCRIPTION_REFRESH`` get a fresh one. A post answered ``410 Gone`` removes that connection's
subscriptions. The handler never raises: an unexpected error is logged with its traceback,
answered ``internal error`` to the client and HTTP 500 to API Gateway.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from enum import StrEnum
from typing import Any

from polysignal.core.errors import ClientError
from polysignal.core.topics import TopicLimitExceeded, TopicRegistry
from polysignal.protocols import topics as proto
from polysignal.serverless.sender import Delivery, Sender, fan_out, management_endpoint
from polysignal.serverless.settings import ServerlessSettings
from polysignal.serverless.store import MAX_TOPIC_BYTES, Subscription, SubscriptionStore

log = logging.getLogger("polysignal.serverless")

Event = Mapping[str, Any]
Response = dict[str, Any]
SenderFor = Callable[[Mapping[str, Any]], Sender]
"""Returns the sender for an event's ``requestContext`` (its API stage)."""

_HEADERS = {"Content-Type": "text/plain", "Access-Control-Allow-Origin": "*"}


class Route(StrEnum):
    CONNECT = "$connect"
    DISCONNECT = "$disconnect"
    DEFAULT = "$default"


def response(status: int, body: str) -> Response:
    """The HTTP answer to API Gateway (the original's shape: text/plain, CORS open)."""
    return {"statusCode": status, "headers": dict(_HEADERS), "body": body}


class SignalingHandler:
    """``handler(event, context)`` over a subscription store and a sender."""

    def __init__(
        self,
        settings: ServerlessSettings,
        store: SubscriptionStore,
        sender_for: SenderFor,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.store = store
        self.sender_for = sender_for
        self.clock = clock
        self.limits = proto.TopicLimits(settings.max_topic_length)
        self._executor: ThreadPoolExecutor | None = None
        self._executor_lock = threading.Lock()

    def __call__(self, event: Event, context: object = None) -> Response:
        request = event.get("requestContext") if isinstance(event, Mapping) else None
        if not isinstance(request, Mapping):
            return response(400, "Missing connectionId")
        connection_id = request.get("connectionId")
        if not isinstance(connection_id, str) or not connection_id:
            return response(400, "Missing connectionId")
        route = request.get("routeKey")
        sender: Sender | None = None
        try:
            match route:
                case Route.CONNECT:
                    log.debug("%s connected", connection_id)
                case Route.DISCONNECT:
                    topics = self.store.drop_connection(connection_id)
                    log.debug("%s disconnected, left %d topic(s)", connection_id, len(topics))
                case Route.DEFAULT:
                    sender = self.sender_for(request)
                    self._message(connection_id, event, sender)
                case _:
                    return response(400, f"unknown route {str(route)[:40]!r}")
        except Exception:
            log.exception("%s: error handling %s", connection_id, route)
            if sender is not None:
                self._reply(sender, connection_id, proto.encode_error("internal error"))
            return response(500, "internal error")
        return response(200, "ok")

    # --- one frame ---
    def _message(self, connection_id: str, event: Event, sender: Sender) -> None:
        # API Gateway hands binary frames over base64-encoded; the protocol is JSON text.
        if event.get("isBase64Encoded"):
            self._reply(
                sender,
                connection_id,
                proto.encode_error("binary frames are not supported; send JSON text"),
            )
            return
        body = event.get("body")
        frame = "" if body is None else body if isinstance(body, str) else str(body)
        # surrogatepass: a lone surrogate is counted here and refused by the decoder.
        size = len(frame.encode("utf-8", "surrogatepass"))
        if size > self.settings.max_frame_bytes:
            self._reply(
                sender,
                connection_id,
                proto.encode_error(
                    f"message too large ({size} bytes; the limit is "
                    f"{self.settings.max_frame_bytes})"
                ),
            )
            return
        try:
            cmd = proto.decode(frame, self.limits)
        except ClientError as exc:
            log.debug("%s: bad frame <%d bytes>: %s", connection_id, size, exc.message)
            self._reply(sender, connection_id, proto.encode_error(exc.message))
            return
        now = self.clock()
        held = self._touch(connection_id, now)
        match cmd:
            case proto.Subscribe():
                self._subscribe(connection_id, cmd, held, sender, now)
            case proto.Unsubscribe():
                self.store.remove(connection_id, cmd.topics)
                if cmd.problems:
                    self._reply(
                        sender,
                        connection_id,
                        proto.skipped_entries_error("unsubscribe", cmd.problems),
                    )
            case proto.Publish():
                self._publish(connection_id, cmd, sender, now)
            case proto.Ping():
                self._reply(sender, connection_id, proto.PONG)

    def _touch(self, connection_id: str, now: float) -> list[Subscription]:
        """Refresh the TTLs that are due (the connection is alive); return what it holds."""
        held = self.store.topics_of(connection_id)
        due = now + self.settings.subscription_ttl - self.settings.subscription_refresh
        stale = [sub for sub in held if sub.expires <= due]
        if stale:
            refreshed = self.store.refresh(stale, now)
            log.debug("%s: refreshed %d subscription TTL(s)", connection_id, refreshed)
        return held

    def _subscribe(
        self,
        connection_id: str,
        cmd: proto.Subscribe,
        held: list[Subscription],
        sender: Sender,
        now: float,
    ) -> None:
        problems = list(cmd.problems)
        topics: list[str] = []
        for topic in cmd.topics:
            if len(topic.encode()) > MAX_TOPIC_BYTES:
                problems.append(f"a topic is longer than {MAX_TOPIC_BYTES} UTF-8 bytes")
            else:
                topics.append(topic)
        # The same per-connection limit and message as the server, through the same registry.
        registry: TopicRegistry[str] = TopicRegistry(self.settings.max_topics_per_connection)
        # Already over a limit lowered since: nothing more fits.
        with suppress(TopicLimitExceeded):
            registry.subscribe(connection_id, [sub.topic for sub in held])
        try:
            added = registry.subscribe(connection_id, topics)
        except TopicLimitExceeded as exc:
            added = exc.added
            self._reply(sender, connection_id, proto.encode_error(exc.message))
        self.store.add(connection_id, added, now)
        if problems:
            self._reply(
                sender, connection_id, proto.skipped_entries_error("subscribe", tuple(problems))
            )

    def _publish(self, connection_id: str, cmd: proto.Publish, sender: Sender, now: float) -> None:
        if len(cmd.topic.encode()) > MAX_TOPIC_BYTES:
            self._reply(
                sender,
                connection_id,
                proto.encode_error(f"publish: topic longer than {MAX_TOPIC_BYTES} UTF-8 bytes"),
            )
            return
        subscribers = self.store.subscribers(cmd.topic, now)
        # One encoding for every recipient; `clients` counts the sender if subscribed.
        payload = proto.encode_publish(cmd.message, len(subscribers), self.settings.origin)
        targets = (
            subscribers
            if self.settings.echo
            else [peer for peer in subscribers if peer != connection_id]
        )
        log.debug("%s publish to %d of %d", connection_id, len(targets), len(subscribers))
        for gone in fan_out(sender, targets, payload, self._pool):
            self._forget(gone)

    # --- output ---
    def _reply(self, sender: Sender, connection_id: str, data: bytes) -> None:
        if sender.post(connection_id, data) is Delivery.GONE:
            self._forget(connection_id)

    def _forget(self, connection_id: str) -> None:
        """A post was answered 410 Gone: the connection is stale, drop its subscriptions."""
        try:
            topics = self.store.drop_connection(connection_id)
        except Exception:
            log.exception("cleanup of stale connection %s failed", connection_id)
            return
        log.info("stale connection %s removed from %d topic(s)", connection_id, len(topics))

    def _pool(self) -> ThreadPoolExecutor:
        # Made on first use and kept: a warm Lambda reuses it across invocations.
        with self._executor_lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(
                    max_workers=self.settings.fanout_concurrency,
                    thread_name_prefix="polysignal-fanout",
                )
            return self._executor

    def close(self) -> None:
        with self._executor_lock:
            if self._executor is not None:
                self._executor.shutdown(wait=True)
                self._executor = None


# --- the AWS wiring ---------------------------------------------------------------------------


class ManagementSenders:
    """One ``ApiGatewaySender`` per Management API endpoint, made once and reused while warm."""

    def __init__(self, settings: ServerlessSettings) -> None:
        self.settings = settings
        self._senders: dict[str, Sender] = {}
        self._lock = threading.Lock()

    def __call__(self, request: Mapping[str, Any]) -> Sender:
        from polysignal.serverless.aws import management_client
        from polysignal.serverless.sender import ApiGatewaySender

        endpoint = self.settings.management_endpoint or management_endpoint(
            request, self.settings.region
        )
        if endpoint is None:
            raise ValueError("the event names no apiId/stage and no management endpoint is set")
        with self._lock:
            sender = self._senders.get(endpoint)
            if sender is None:
                client = management_client(self.settings, endpoint)
                sender = ApiGatewaySender(client, self.settings.fanout_concurrency)
                self._senders[endpoint] = sender
            return sender


def build_handler(environ: Mapping[str, str] | None = None) -> SignalingHandler:
    """The handler configured from the environment (``os.environ`` by default)."""
    from polysignal.serverless.aws import dynamodb_client

    settings = ServerlessSettings.from_env(environ)
    logging.getLogger("polysignal").setLevel(settings.log_level)
    store = SubscriptionStore(
        dynamodb_client(settings), settings.table_name, settings.subscription_ttl
    )
    return SignalingHandler(settings, store, ManagementSenders(settings))
