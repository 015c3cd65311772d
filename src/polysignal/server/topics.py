"""Serving the topics protocol (y-webrtc / Flow-Like) on WebSocket ``/``.

Delivery semantics (PROTOCOLS.md §1.4, DESIGN.md §5): a publish reaches every other subscriber
of its topic exactly once, cluster-wide, with ``clients`` (cluster-wide subscriber count, the
sender included when subscribed) and ``_origin`` (the node where it entered); no echo to the
sender unless ``ECHO=1``; the publisher need not be subscribed. The outbound frame is encoded
once and the same bytes are written to every local recipient and handed once to the backend.
"""

from __future__ import annotations

import logging

from aiohttp import WSMsgType, web

from polysignal.core.errors import ClientError
from polysignal.core.topics import TopicLimitExceeded, TopicRegistry
from polysignal.logs import elide
from polysignal.protocols import topics as proto
from polysignal.server.connection import Connection
from polysignal.server.frames import build_frame
from polysignal.server.node import Node

log = logging.getLogger("polysignal.topics")

PONG_FRAME = build_frame(proto.PONG)


class TopicsHub:
    """This node's topic subscriptions and the fan-out between them and the backend."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.registry: TopicRegistry[Connection] = TopicRegistry(
            node.settings.max_topics_per_connection
        )
        self.limits = proto.TopicLimits(node.settings.max_topic_length)
        self.echo = node.settings.echo
        node.backend.on_topic_message(self.deliver_remote)

    # --- commands ---
    def subscribe(self, conn: Connection, cmd: proto.Subscribe) -> None:
        try:
            added = self.registry.subscribe(conn, cmd.topics)
        except TopicLimitExceeded as exc:
            added = exc.added
            conn.send_text(proto.encode_error(exc.message))
        self._counts_changed(added)
        if cmd.problems:
            conn.send_text(proto.skipped_entries_error("subscribe", cmd.problems))

    def unsubscribe(self, conn: Connection, cmd: proto.Unsubscribe) -> None:
        self._counts_changed(self.registry.unsubscribe(conn, cmd.topics))
        if cmd.problems:
            conn.send_text(proto.skipped_entries_error("unsubscribe", cmd.problems))

    def remove(self, conn: Connection) -> None:
        self._counts_changed(self.registry.remove(conn))

    async def publish(self, conn: Connection, cmd: proto.Publish) -> None:
        topic = cmd.topic
        subscribers = self.registry.subscribers(topic)
        local = len(subscribers)
        clients = await self.node.backend.topic_clients(topic, local)
        payload = proto.encode_publish(cmd.message, clients, self.node.node_id)
        if local:
            frame = build_frame(payload)
            skip = None if self.echo else conn
            # Copy: a send may close a slow peer, whose cleanup edits the set.
            for peer in tuple(subscribers):
                if peer is not skip:
                    peer.send_frame(frame)
        # The backend forwards only to nodes with subscribers (memory: none but this one).
        await self.node.backend.publish(topic, payload)

    def deliver_remote(self, topic: str, payload: bytes) -> None:
        """A publish that entered on another node: write it to every local subscriber."""
        subscribers = self.registry.subscribers(topic)
        if not subscribers:
            return
        frame = build_frame(payload)
        for peer in tuple(subscribers):
            peer.send_frame(frame)

    def _counts_changed(self, topics: list[str]) -> None:
        backend = self.node.backend
        for topic in topics:
            backend.local_count_changed(topic, self.registry.count(topic))

    # --- one connection ---
    async def handle(self, request: web.Request) -> web.StreamResponse:
        async with self.node.websocket(request, "topics") as conn:
            try:
                async for msg in conn.ws:
                    if msg.type is WSMsgType.TEXT:
                        await self._on_frame(conn, msg.data)
                    elif msg.type is WSMsgType.BINARY:
                        conn.send_text(
                            proto.encode_error("binary frames are not supported; send JSON text")
                        )
                    elif msg.type is WSMsgType.ERROR:
                        log.debug("%r: %s", conn, conn.ws.exception())
            finally:
                self.remove(conn)
            return conn.ws

    async def _on_frame(self, conn: Connection, data: str) -> None:
        if not conn.allow_message():
            if conn.should_report_rate_limit():
                conn.send_text(proto.rate_limited_error(self.node.settings.rate_limit))
            return
        try:
            cmd = proto.decode(data, self.limits)
        except ClientError as exc:
            log.debug("%r: bad frame %s: %s", conn, elide(data), exc.message)
            conn.send_text(proto.encode_error(exc.message))
            return
        try:
            match cmd:
                case proto.Publish():
                    if log.isEnabledFor(logging.DEBUG):  # elide() costs on every publish
                        log.debug("%r publish %s", conn, elide(data))
                    await self.publish(conn, cmd)
                case proto.Subscribe():
                    self.subscribe(conn, cmd)
                case proto.Unsubscribe():
                    self.unsubscribe(conn, cmd)
                case proto.Ping():
                    conn.send_frame(PONG_FRAME)
        except Exception:
            log.exception("%r: error handling %s", conn, type(cmd).__name__)
            conn.send_text(proto.encode_error("internal error"))


def setup(app: web.Application, node: Node) -> TopicsHub:
    """The topics protocol is the fallback WebSocket route, so it registers no matcher."""
    return TopicsHub(node)
