"""Helpers of the serverless tests: template.yaml as data, API Gateway-shaped events, a client
for driving the handler, and a recording stand-in for the API Gateway Management API on loopback."""

from __future__ import annotations

import base64
import contextlib
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import aiohttp
import yaml

from polysignal.config import Settings
from polysignal.server.runner import NodeServer
from polysignal.serverless.local import create_local_app
from polysignal.serverless.service import SignalingHandler
from polysignal.serverless.settings import ServerlessSettings

from support import ROOT, free_port

TEMPLATE = ROOT / "template.yaml"
REGION = "us-east-1"
FAKE_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
}


class _CloudFormationLoader(yaml.SafeLoader):
    """YAML loader that keeps CloudFormation's short tags (!Ref, !Sub, ...) as {tag: value}."""


def _tagged(loader: yaml.SafeLoader, suffix: str, node: yaml.Node) -> Any:
    if isinstance(node, yaml.ScalarNode):
        value: Any = loader.construct_scalar(node)
    elif isinstance(node, yaml.SequenceNode):
        value = loader.construct_sequence(node, deep=True)
    else:
        value = loader.construct_mapping(node, deep=True)  # type: ignore[arg-type]
    return {suffix: value}


_CloudFormationLoader.add_multi_constructor("!", _tagged)


def load_template(path: Path = TEMPLATE) -> dict[str, Any]:
    return yaml.load(path.read_text(), Loader=_CloudFormationLoader)


def table_resource(template: Mapping[str, Any]) -> dict[str, Any]:
    tables = [r for r in template["Resources"].values() if r["Type"] == "AWS::DynamoDB::Table"]
    assert len(tables) == 1, "template.yaml must declare exactly one DynamoDB table"
    return tables[0]["Properties"]


def create_table_kwargs(template: Mapping[str, Any]) -> dict[str, Any]:
    """CreateTable arguments from the template's table (TTL is a separate call)."""
    props = table_resource(template)
    return {
        key: props[key]
        for key in ("AttributeDefinitions", "KeySchema", "GlobalSecondaryIndexes", "BillingMode")
    }


def scan_items(dynamodb: Any, table: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    kwargs: dict[str, Any] = {"TableName": table}
    for _ in range(100):
        page = dynamodb.scan(**kwargs)
        items.extend(page["Items"])
        if "LastEvaluatedKey" not in page:
            break
        kwargs["ExclusiveStartKey"] = page["LastEvaluatedKey"]
    return items


class ManagementApi:
    """Records ``POST /{stage}/@connections/{id}``; 410 for ids in ``gone``, 403 in ``failing``."""

    def __init__(self) -> None:
        self.port = free_port()
        self.lock = threading.Lock()
        self.posts: list[tuple[str, bytes]] = []
        self.gone: set[str] = set()
        self.failing: set[str] = set()
        self.attempts: dict[str, int] = {}
        api = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                body = self.rfile.read(length)
                marker = "/@connections/"
                if marker not in self.path:
                    self._answer(404, "NotFoundException")
                    return
                connection_id = unquote(self.path.split(marker, 1)[1])
                with api.lock:
                    api.attempts[connection_id] = api.attempts.get(connection_id, 0) + 1
                    if connection_id in api.gone:
                        status, error = 410, "GoneException"
                    elif connection_id in api.failing:
                        status, error = 403, "ForbiddenException"
                    else:
                        api.posts.append((connection_id, body))
                        status, error = 200, ""
                self._answer(status, error)

            def _answer(self, status: int, error: str) -> None:
                payload = json.dumps({"message": error}).encode() if error else b""
                self.send_response(status)
                if error:
                    self.send_header("x-amzn-ErrorType", error)
                    self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/test"

    def frames(self, connection_id: str) -> list[Any]:
        """The JSON frames posted to one connection, in order."""
        with self.lock:
            return [json.loads(body) for cid, body in self.posts if cid == connection_id]

    def recipients(self) -> list[str]:
        with self.lock:
            return [cid for cid, _ in self.posts]

    def clear(self) -> None:
        with self.lock:
            self.posts.clear()
            self.attempts.clear()


def ws_event(
    route: str, connection_id: str, body: str | bytes | None = None, **context: Any
) -> dict[str, Any]:
    """An API Gateway WebSocket proxy event, shaped as AWS documents it."""
    now = int(time.time() * 1000)
    event: dict[str, Any] = {
        "requestContext": {
            "routeKey": route,
            "eventType": {"$connect": "CONNECT", "$disconnect": "DISCONNECT"}.get(route, "MESSAGE"),
            "messageDirection": "IN",
            "extendedRequestId": uuid.uuid4().hex[:16],
            "requestTime": time.strftime("%d/%b/%Y:%H:%M:%S +0000", time.gmtime()),
            "stage": "test",
            "connectedAt": now,
            "requestTimeEpoch": now,
            "identity": {"sourceIp": "127.0.0.1"},
            "requestId": uuid.uuid4().hex[:16],
            "domainName": "abc123.execute-api.us-east-1.amazonaws.com",
            "connectionId": connection_id,
            "apiId": "abc123",
            **context,
        },
        "isBase64Encoded": False,
    }
    if route == "$default":
        event["requestContext"]["messageId"] = uuid.uuid4().hex[:16]
    if isinstance(body, bytes):
        event["body"] = base64.b64encode(body).decode()
        event["isBase64Encoded"] = True
    elif body is not None:
        event["body"] = body
    return event


class Client:
    """One API Gateway connection driving the handler with events, like API Gateway would."""

    def __init__(self, handler: SignalingHandler, management: ManagementApi, cid: str) -> None:
        self.handler = handler
        self.management = management
        self.id = cid

    def connect(self) -> Client:
        assert self.handler(ws_event("$connect", self.id))["statusCode"] == 200
        return self

    def send(self, message: Any) -> dict[str, Any]:
        body = message if isinstance(message, str | bytes) else json.dumps(message)
        return self.handler(ws_event("$default", self.id, body))

    def subscribe(self, *topics: str) -> None:
        assert self.send({"type": "subscribe", "topics": list(topics)})["statusCode"] == 200

    def disconnect(self) -> dict[str, Any]:
        return self.handler(ws_event("$disconnect", self.id))

    def frames(self) -> list[Any]:
        return self.management.frames(self.id)


@contextlib.asynccontextmanager
async def running_local(env: Mapping[str, str]) -> AsyncIterator[LocalServer]:
    """``serverless-local``'s app, configured from ``env``, on a free loopback port."""
    settings = ServerlessSettings.from_env(env)
    app = create_local_app(settings, Settings.of(log_level="WARNING", shutdown_timeout=2))
    node_server = NodeServer(app)
    port = await node_server.start("127.0.0.1", 0)
    session = aiohttp.ClientSession()
    server = LocalServer(port, session)
    try:
        yield server
    finally:
        for ws in server.sockets:
            with contextlib.suppress(Exception):
                await ws.close()
        await session.close()
        await node_server.stop()


@dataclass
class LocalServer:
    port: int
    session: aiohttp.ClientSession
    sockets: list[aiohttp.ClientWebSocketResponse] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def ws(self, **kwargs: Any) -> aiohttp.ClientWebSocketResponse:
        ws = await self.session.ws_connect(f"ws://127.0.0.1:{self.port}/", **kwargs)
        self.sockets.append(ws)
        return ws
