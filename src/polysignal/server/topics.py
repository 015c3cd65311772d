"""Serving the topics protocol (y-webrtc / Flow-Like), the fallback WebSocket route.

Delivery semantics (docs/protocols/topics.md): a publish reaches every other subscriber of its
topic exactly once, cluster-wide, with ``clients`` (cluster-wide subscriber count, the sender
included when subscribed) and ``_origin`` (the node where it entered); no echo to the sender
unless ``ECHO=1``; the publisher need not be subscribed. The outbound frame is encoded once and the
same bytes are written to every local recipient and handed once to the backend.
"""

from __future__ import annotations

from polysignal.core.errors import Answer, MalformedFrame, Reply
from polysignal.core.topics import TopicRegistry, TopicsRules
from polysignal.protocols import topics as proto
from polysignal.protocols.websocket import build_frame
from polysignal.server.connection import Connection
from polysignal.server.driver import Handler, Result
from polysignal.server.node import Node

PONG_FRAME = build_frame(proto.PONG)
BINARY_REFUSED = MalformedFrame("binary frames are not supported; send JSON text")


class TopicsHub(Handler):
    """This node's topic subscriptions and the fan-out between them and the backend."""

    protocol = "topics"

    def __init__(self, node: Node) -> None:
        self.node = node
        self.registry: TopicRegistry[Connection] = TopicRegistry(
            node.settings.topics.max_topics_per_connection,
            node.settings.topics.max_topics_per_address,
        )
        self.rules = TopicsRules(self.registry)
        self.limits = proto.TopicLimits(node.settings.topics.max_topic_length)
        self.echo = node.settings.topics.echo
        self.rate_error = proto.rate_limited_error(node.settings.limits.rate_limit)
        # Messages by kind (``/metrics``): commands received, publishes and pongs written.
        self.received = {"publish": 0, "subscribe": 0, "unsubscribe": 0, "ping": 0}
        self.sent = {"publish": 0, "pong": 0}
        node.backend.on_topic_message(self.deliver_remote)

    # --- the driver's callbacks ---
    def on_message(self, conn: Connection, data: bytes, binary: bool) -> Result:
        if binary:
            raise BINARY_REFUSED
        cmd = proto.decode(data, self.limits)
        received = self.received
        match cmd:
            case proto.Publish():
                received["publish"] += 1
                if conn.identity is not None:
                    refusal = self.rules.publish_refusal(conn.identity, cmd.topic)
                    if refusal is not None:
                        conn.send_text(refusal)
                        return None
                return self.publish(conn, cmd)
            case proto.Subscribe():
                received["subscribe"] += 1
                self._answer(conn, *self.rules.subscribe(conn, cmd, conn.address, conn.identity))
            case proto.Unsubscribe():
                received["unsubscribe"] += 1
                self._answer(conn, *self.rules.unsubscribe(conn, cmd))
            case proto.Ping():
                received["ping"] += 1
                if conn.send_frame(PONG_FRAME):
                    self.sent["pong"] += 1
        return None

    def typed_counts(self) -> tuple[dict[str, int], dict[str, int]]:
        return self.received, self.sent

    def held(self) -> dict[str, int]:
        return {"topics": len(self.registry)}

    def on_close(self, conn: Connection) -> Result:
        self._counts_changed(self.registry.remove(conn))
        return None

    def answer(self, conn: Connection, error: Exception) -> Answer:
        return proto.answer(error)

    def rate_limited(self, conn: Connection, data: bytes, binary: bool, report: bool) -> Answer:
        return Reply(self.rate_error) if report else None

    # --- commands ---
    def _answer(self, conn: Connection, answers: list[bytes], changed: list[str]) -> None:
        for frame in answers:
            conn.send_text(frame)
        self._counts_changed(changed)

    def publish(self, conn: Connection, cmd: proto.Publish) -> Result:
        """Fan ``cmd`` out, to this node's subscribers at once, with the best known cluster-wide
        count (never waiting for the cluster); a coroutine only when the backend's outbox is
        full."""
        backend = self.node.backend
        topic = cmd.topic
        subscribers = self.registry.subscribers(topic)
        clients = backend.topic_clients_nowait(topic, len(subscribers))
        payload = self._deliver(conn, cmd, subscribers, clients)
        # The backend forwards only to nodes with subscribers (memory: none but this one).
        if backend.publish_nowait(topic, payload):
            return None
        return backend.publish(topic, payload)

    def _deliver(
        self,
        conn: Connection,
        cmd: proto.Publish,
        subscribers: frozenset[Connection] | set[Connection],
        clients: int,
    ) -> bytes:
        """Write the publish to this node's subscribers; its payload, for the other nodes."""
        payload = proto.encode_publish(cmd.message, clients, self.node.node_id)
        if subscribers:
            frame = build_frame(payload)
            skip = None if self.echo else conn
            sent = 0
            # Copy: a send may close a slow peer, whose cleanup edits the set.
            for peer in tuple(subscribers):
                if peer is not skip and peer.send_frame(frame):
                    sent += 1
            self.sent["publish"] += sent
        return payload

    def deliver_remote(self, topic: str, payload: bytes) -> None:
        """A publish that entered on another node: write it to every local subscriber."""
        subscribers = self.registry.subscribers(topic)
        if not subscribers:
            return
        frame = build_frame(payload)
        sent = 0
        for peer in tuple(subscribers):
            if peer.send_frame(frame):
                sent += 1
        self.sent["publish"] += sent

    def _counts_changed(self, topics: list[str]) -> None:
        backend = self.node.backend
        for topic in topics:
            backend.local_count_changed(topic, self.registry.count(topic))
