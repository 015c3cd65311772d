"""The serverless shape's cost model: what each signaling action costs on AWS, polysignal's handler
against the original design (jeffrafter/signaling), counted on moto's DynamoDB.

No wall clock is measured. Each action runs against moto (in-process ``mock_aws``: no sockets, no
AWS) and every DynamoDB call is recorded through botocore's ``before-call``/``after-call`` events
with its request and response sizes. Capacity units follow DynamoDB's published on-demand rules:

* writes: 1 write request unit (WRU) per started 1 KB of the item, the larger of its sizes
  before and after the write (PutItem, UpdateItem, DeleteItem and each request of a
  BatchWriteItem alike); a write that adds, changes or removes an entry of the global secondary
  index ``gs1`` (keys ``sk`` + ``data``, projection ALL) costs the same again on the index
  (2x when it changes the index key);
* reads: a Query is one read over the summed size of the items it returns, rounded up to the next
  4 KB: 1 read request unit (RRU) per 4 KB strongly consistent, 0.5 eventually consistent (every
  read of a GSI is eventually consistent); at least one 4 KB unit per Query.

Item sizes are DynamoDB's: attribute names plus values (strings in UTF-8 bytes, numbers about
one byte per two significant digits plus one). The size an item had before a write, and the full
size of items a Query returns through a projection, are read from moto by a second client that is
not recorded.

Around the DynamoDB calls the model counts the Lambda invocations (one per API Gateway event) and
the API Gateway WebSocket messages (the client's frame, and every ``PostToConnection``, each
billed per started 32 KB), and turns them into dollars per million actions at the price list in
``PRICES`` (docs/serverless.md, "Cost").

The original is modelled from its README's description, not from its code: the same table (``pk``
``topic-TOPIC``, ``sk`` ``connection-<id>``, GSI ``gs1`` on ``sk`` + ``data``), subscribe = one
PutItem per topic, unsubscribe = one DeleteItem per topic, publish = Query the topic (eventually
consistent, as its README's read budget assumes) then post to every connection found, disconnect =
Query ``gs1`` then DeleteItem each item, ping = a pong (as y-webrtc's server.js, which it follows).

Run: ``.venv/bin/python bench/serverless_cost.py [--json PATH]`` (or ``bench/run --scenarios
cost``); it prints the Markdown tables.
"""

from __future__ import annotations

import argparse
import base64
import json
import math
import os
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from decimal import Decimal
from typing import Any

Json = dict[str, Any]
Item = dict[str, Any]  # a DynamoDB attribute map: {"name": {"S": "..."}}

REGION = "us-east-1"
INDEX = "gs1"
INDEX_KEYS = ("sk", "data")
WRITE_UNIT_BYTES = 1024
READ_UNIT_BYTES = 4096
MESSAGE_UNIT_BYTES = 32 * 1024  # API Gateway bills WebSocket messages per started 32 KB


@dataclass(frozen=True)
class PriceList:
    """The prices the dollars are computed at (docs/serverless.md, "Cost")."""

    as_of: str = "2026-12-01"
    region: str = "us-east-1"
    dynamodb_write_per_million: float = 0.625  # on-demand write request units
    dynamodb_read_per_million: float = 0.125  # on-demand read request units
    lambda_request_per_million: float = 0.20
    lambda_gb_second: float = 0.0000133334  # arm64 (the template's architecture)
    lambda_memory_mb: int = 128
    api_message_per_million: float = 1.00  # WebSocket messages, first billion, per 32 KB
    api_connection_minute_per_million: float = 0.25


PRICES = PriceList()


@dataclass(frozen=True)
class DurationModel:
    """Lambda's billed duration per invocation, a stated assumption (nothing is timed): a fixed
    part, plus one round trip per DynamoDB call (made one after another) and per group of
    ``post_concurrency`` posts (made in parallel)."""

    base_ms: float = 5.0
    round_trip_ms: float = 10.0
    post_concurrency: int = 16  # polysignal's FANOUT_CONCURRENCY; assumed for the original too

    def billed_ms(self, dynamodb_calls: int, posts: int) -> float:
        groups = math.ceil(posts / self.post_concurrency) if posts else 0
        return math.ceil(self.base_ms + self.round_trip_ms * (dynamodb_calls + groups))


DURATION = DurationModel()


# --- DynamoDB's size and capacity rules --------------------------------------------------------


def value_size(value: Json) -> int:
    (kind, raw), *_ = value.items()
    match kind:
        case "S":
            return len(str(raw).encode())
        case "N":
            digits = str(raw).lstrip("-").replace(".", "").strip("0") or "0"
            return (len(digits) + 1) // 2 + 1
        case "B":
            data = raw if isinstance(raw, bytes) else base64.b64decode(raw)
            return len(data)
        case "BOOL" | "NULL":
            return 1
        case "SS":
            return sum(len(str(s).encode()) for s in raw)
        case "NS":
            return sum(value_size({"N": n}) for n in raw)
        case "L":
            return 3 + sum(value_size(v) + 1 for v in raw)
        case "M":
            return 3 + sum(len(k.encode()) + value_size(v) + 1 for k, v in raw.items())
    return len(json.dumps(raw))


def item_size(item: Item | None) -> int:
    if not item:
        return 0
    return sum(len(name.encode()) + value_size(value) for name, value in item.items())


def write_units(size: int) -> int:
    return max(1, math.ceil(size / WRITE_UNIT_BYTES))


def in_index(item: Item | None) -> bool:
    return bool(item) and all(key in item for key in INDEX_KEYS)  # type: ignore[operator]


def index_write_units(old: Item | None, new: Item | None) -> int:
    """The GSI's share of one base-table write (projection ALL: the index entry is the item)."""
    before, after = in_index(old), in_index(new)
    if before and after:
        assert old is not None and new is not None
        moved = any(old[k] != new[k] for k in INDEX_KEYS)
        if moved:  # the entry is deleted under the old key and put under the new one
            return write_units(item_size(old)) + write_units(item_size(new))
        return write_units(max(item_size(old), item_size(new)))
    if before:
        return write_units(item_size(old))
    if after:
        return write_units(item_size(new))
    return 0


def read_units(total_bytes: int, consistent: bool) -> float:
    units = max(1, math.ceil(total_bytes / READ_UNIT_BYTES))
    return float(units) if consistent else units / 2


# --- recording ---------------------------------------------------------------------------------


@dataclass
class Call:
    """One DynamoDB call as billed."""

    operation: str
    request_bytes: int
    response_bytes: int
    items: int = 0  # items written (one per write request) or returned
    write_units: int = 0
    index_write_units: int = 0
    read_units: float = 0.0


@dataclass
class Ledger:
    """What one action cost."""

    calls: list[Call] = field(default_factory=list)
    posts: list[int] = field(default_factory=list)  # bytes of each PostToConnection
    inbound_bytes: list[int] = field(default_factory=list)  # the client's frames
    invocations: int = 0

    def operations(self) -> dict[str, int]:
        return dict(Counter(call.operation for call in self.calls))

    def summary(self, prices: PriceList = PRICES, duration: DurationModel = DURATION) -> Json:
        wru = sum(c.write_units + c.index_write_units for c in self.calls)
        rru = sum(c.read_units for c in self.calls)
        messages = sum(max(1, math.ceil(b / MESSAGE_UNIT_BYTES)) for b in self.inbound_bytes)
        messages += sum(max(1, math.ceil(b / MESSAGE_UNIT_BYTES)) for b in self.posts)
        billed_ms = (
            duration.billed_ms(len(self.calls), len(self.posts)) if self.invocations else 0.0
        )
        gb_seconds = self.invocations * billed_ms / 1000 * prices.lambda_memory_mb / 1024
        dollars = {
            "dynamodbWrites": wru * prices.dynamodb_write_per_million,
            "dynamodbReads": rru * prices.dynamodb_read_per_million,
            "lambdaRequests": self.invocations * prices.lambda_request_per_million,
            "lambdaDuration": gb_seconds * prices.lambda_gb_second * 1e6,
            "apiGatewayMessages": messages * prices.api_message_per_million,
        }
        return {
            "dynamodbCalls": len(self.calls),
            "operations": self.operations(),
            "baseWriteUnits": sum(c.write_units for c in self.calls),
            "indexWriteUnits": sum(c.index_write_units for c in self.calls),
            "writeUnits": wru,
            "readUnits": rru,
            "requestBytes": sum(c.request_bytes for c in self.calls),
            "responseBytes": sum(c.response_bytes for c in self.calls),
            "lambdaInvocations": self.invocations,
            "lambdaBilledMs": billed_ms,
            "posts": len(self.posts),
            "apiGatewayMessages": messages,
            "dollarsPerMillion": {k: round(v, 4) for k, v in dollars.items()},
            "dollarsPerMillionTotal": round(sum(dollars.values()), 4),
        }


class Recorder:
    """Records every call of one DynamoDB client into the current ledger, with its capacity.

    ``shadow`` is a second client on the same (moto) endpoint whose calls are not recorded: it
    reads items before a write and the whole items behind a projected Query.
    """

    def __init__(self, client: Any, shadow: Any) -> None:
        self.client = client
        self.shadow = shadow
        self.ledger: Ledger | None = None
        self._pending: dict[int, tuple[Json, list[tuple[Item, Item | None]]]] = {}
        events = client.meta.events
        events.register("before-call.dynamodb", self._before)
        events.register("after-call.dynamodb", self._after)

    @contextmanager
    def recording(self, ledger: Ledger) -> Iterator[Ledger]:
        self.ledger = ledger
        try:
            yield ledger
        finally:
            self.ledger = None

    def _get(self, table: str, key: Item) -> Item | None:
        item: Item | None = self.shadow.get_item(TableName=table, Key=key, ConsistentRead=True).get(
            "Item"
        )
        return item

    def _before(self, model: Any, params: Json, context: Json, **_: Any) -> None:
        if self.ledger is None:
            return
        body = params.get("body") or b"{}"
        request: Json = json.loads(body)
        op: str = model.name
        # The items as they were before the write, one per written key.
        before: list[tuple[Item, Item | None]] = []
        if op in ("PutItem", "UpdateItem", "DeleteItem"):
            key = request.get("Key") or {k: request["Item"][k] for k in ("pk", "sk")}
            before.append((key, self._get(request["TableName"], key)))
        elif op == "BatchWriteItem":
            for table, writes in request["RequestItems"].items():
                for write in writes:
                    if "PutRequest" in write:
                        item = write["PutRequest"]["Item"]
                        key = {k: item[k] for k in ("pk", "sk")}
                    else:
                        key = write["DeleteRequest"]["Key"]
                    before.append(({"__table": {"S": table}, **key}, self._get(table, key)))
        self._pending[id(context)] = ({"op": op, "request": request, "bytes": len(body)}, before)

    def _after(self, http_response: Any, parsed: Json, context: Json, **_: Any) -> None:
        if self.ledger is None:
            return
        meta, before = self._pending.pop(id(context), ({}, []))
        op, request = meta.get("op", ""), meta.get("request", {})
        call = Call(op, meta.get("bytes", 0), len(http_response.content or b""))
        if op in ("PutItem", "UpdateItem", "DeleteItem"):
            key, old = before[0]
            new = None if op == "DeleteItem" else self._get(request["TableName"], key)
            call.items = 1
            call.write_units = write_units(max(item_size(old), item_size(new)))
            call.index_write_units = index_write_units(old, new)
        elif op == "BatchWriteItem":
            unprocessed = parsed.get("UnprocessedItems") or {}
            assert not unprocessed, "moto left batch items unprocessed"
            for key, old in before:
                table = key.pop("__table")["S"]
                new = self._get(table, key)
                call.items += 1
                call.write_units += write_units(max(item_size(old), item_size(new)))
                call.index_write_units += index_write_units(old, new)
        elif op == "Query":
            table = request["TableName"]
            total = 0
            for item in parsed.get("Items", []):
                # A projection returns part of the item; the read is billed on all of it.
                pk = item.get("pk") or request.get("ExpressionAttributeValues", {}).get(":pk")
                full = self._get(table, {"pk": pk, "sk": item["sk"]}) if pk else None
                total += item_size(full or item)
                call.items += 1
            consistent = bool(request.get("ConsistentRead")) and "IndexName" not in request
            call.read_units = read_units(total, consistent)
        elif op == "GetItem":
            call.items = 1 if parsed.get("Item") else 0
            call.read_units = read_units(
                item_size(parsed.get("Item")), bool(request.get("ConsistentRead"))
            )
        assert self.ledger is not None
        self.ledger.calls.append(call)


class RecordingSender:
    """Stands in for API Gateway's Management API: records each post's size, always delivers."""

    concurrency = 1  # posts one after another (the count does not depend on it)

    def __init__(self) -> None:
        self.ledger: Ledger | None = None

    def post(self, connection_id: str, data: bytes) -> Any:
        from polysignal.serverless.sender import Delivery

        if self.ledger is not None:
            self.ledger.posts.append(len(data))
        return Delivery.SENT


# --- the two designs ----------------------------------------------------------------------------


class Design:
    """One serverless signaling design: API Gateway events in, DynamoDB calls and posts out."""

    name: str

    def connect(self, cid: str) -> None:
        raise NotImplementedError

    def frame(self, cid: str, frame: Json) -> None:
        raise NotImplementedError

    def disconnect(self, cid: str) -> None:
        raise NotImplementedError


class Polysignal(Design):
    """polysignal.serverless.service.SignalingHandler over SubscriptionStore, as deployed."""

    name = "polysignal"

    def __init__(
        self, client: Any, table: str, sender: RecordingSender, clock: Callable[[], float]
    ):
        from polysignal.serverless.service import SignalingHandler
        from polysignal.serverless.settings import ServerlessSettings
        from polysignal.serverless.store import SubscriptionStore

        settings = ServerlessSettings(table_name=table, region=REGION)
        self.settings = settings
        store = SubscriptionStore(client, table, settings.subscription_ttl)
        self.handler = SignalingHandler(settings, store, lambda _request: sender, clock)

    def _event(self, cid: str, route: str, body: str | None = None) -> None:
        event: Json = {
            "requestContext": {
                "connectionId": cid,
                "routeKey": route,
                "apiId": "bench",
                "stage": "signaling",
            }
        }
        if body is not None:
            event["body"] = body
        answer = self.handler(event)
        assert answer["statusCode"] == 200, answer

    def connect(self, cid: str) -> None:
        self._event(cid, "$connect")

    def frame(self, cid: str, frame: Json) -> None:
        self._event(cid, "$default", json.dumps(frame))

    def disconnect(self, cid: str) -> None:
        self._event(cid, "$disconnect")


class Original(Design):
    """jeffrafter/signaling's design as its README describes it (not its code): pk
    ``topic-TOPIC``, sk ``connection-<id>``, ``data`` (the topic: gs1's range key, without which
    the index would not find the item), no TTL."""

    name = "original"

    def __init__(self, client: Any, table: str, sender: RecordingSender) -> None:
        self.client = client
        self.table = table
        self.sender = sender

    def connect(self, cid: str) -> None:
        pass  # the README stores nothing on connect

    def frame(self, cid: str, frame: Json) -> None:
        sk = {"S": f"connection-{cid}"}
        match frame.get("type"):
            case "subscribe":
                for topic in frame.get("topics", []):
                    item = {"pk": {"S": f"topic-{topic}"}, "sk": sk, "data": {"S": topic}}
                    self.client.put_item(TableName=self.table, Item=item)
            case "unsubscribe":
                for topic in frame.get("topics", []):
                    key = {"pk": {"S": f"topic-{topic}"}, "sk": sk}
                    self.client.delete_item(TableName=self.table, Key=key)
            case "publish":
                found = self.client.query(
                    TableName=self.table,
                    KeyConditionExpression="pk = :pk",
                    ExpressionAttributeValues={":pk": {"S": f"topic-{frame['topic']}"}},
                )
                data = json.dumps({**frame, "clients": len(found["Items"])}).encode()
                for item in found["Items"]:
                    self.sender.post(item["sk"]["S"].removeprefix("connection-"), data)
            case "ping":
                self.sender.post(cid, b'{"type":"pong"}')

    def disconnect(self, cid: str) -> None:
        found = self.client.query(
            TableName=self.table,
            IndexName=INDEX,
            KeyConditionExpression="sk = :sk",
            ExpressionAttributeValues={":sk": {"S": f"connection-{cid}"}},
        )
        for item in found["Items"]:
            key = {"pk": item["pk"], "sk": item["sk"]}
            self.client.delete_item(TableName=self.table, Key=key)


# --- the actions --------------------------------------------------------------------------------

# A y-webrtc `signal` publish carrying a 1000-byte fake SDP, as bench S1 sends.
SIGNAL = {
    "type": "publish",
    "topic": "room",
    "from": "peer-0",
    "data": {"type": "signal", "to": "peer-1", "signal": {"type": "offer", "sdp": "v" * 1000}},
}


@dataclass(frozen=True)
class Action:
    key: str
    label: str
    per: int = 1  # deliveries per action (publish): the dollars per delivered message divide by it


ACTIONS = (
    Action("connect", "connect ($connect)"),
    Action("subscribe-1", "subscribe to 1 topic"),
    Action("subscribe-30", "subscribe to 30 topics (one frame)"),
    Action("publish-1", "publish to 1 subscriber", 1),
    Action("publish-10", "publish to 10 subscribers", 10),
    Action("publish-100", "publish to 100 subscribers", 100),
    Action("ping", "ping (idle client, y-webrtc every ~15 s)"),
    Action("ping-refresh", "ping 10 min later (TTL refresh), 1 topic held"),
    Action("unsubscribe-1", "unsubscribe from 1 topic"),
    Action("disconnect-1", "disconnect ($disconnect), 1 topic held"),
    Action("disconnect-30", "disconnect ($disconnect), 30 topics held"),
)


class Bench:
    """Both designs on one moto DynamoDB, each in its own table; ``run(design, action)`` sets up
    fresh connections, then records the action alone."""

    def __init__(self) -> None:
        import boto3

        from polysignal.serverless.store import TABLE_DEFINITION

        def client() -> Any:
            return boto3.client(
                "dynamodb",
                region_name=REGION,
                aws_access_key_id="testing",
                aws_secret_access_key="testing",
            )

        self.client = client()
        self.shadow = client()
        self.recorder = Recorder(self.client, self.shadow)
        self.sender = RecordingSender()
        self.now = 1_800_000_000.0
        self.tables: dict[str, str] = {}
        for name in ("polysignal", "original"):
            table = f"bench-{name}"
            self.shadow.create_table(TableName=table, **TABLE_DEFINITION)
            self.tables[name] = table
        self.designs: dict[str, Design] = {
            "original": Original(self.client, self.tables["original"], self.sender),
            "polysignal": Polysignal(
                self.client, self.tables["polysignal"], self.sender, lambda: self.now
            ),
        }
        self.serial = 0

    def fresh(self, prefix: str) -> str:
        self.serial += 1
        return f"{prefix}{self.serial:06d}="

    def run(self, design_name: str, action: str) -> Ledger:
        design = self.designs[design_name]
        me = self.fresh("me")
        topic = self.fresh("topic-")

        def subscribed(cid: str, topics: list[str]) -> None:
            design.connect(cid)
            design.frame(cid, {"type": "subscribe", "topics": topics})

        body: Json | None = None
        route = "$default"
        kind, _, count = action.partition("-")
        n = int(count) if count.isdigit() else 0
        match kind:
            case "connect":
                route = "$connect"
            case "subscribe":
                design.connect(me)
                body = {"type": "subscribe", "topics": [f"{topic}/{i}" for i in range(n)]}
            case "publish":
                subscribed(me, [topic])
                for _ in range(n):
                    subscribed(self.fresh("peer"), [topic])
                body = {**SIGNAL, "topic": topic}
            case "ping":
                subscribed(me, [topic])
                if action == "ping-refresh":
                    # Past SUBSCRIPTION_REFRESH since the subscribe: the TTL is due.
                    self.now += 601
                body = {"type": "ping"}
            case "unsubscribe":
                subscribed(me, [topic])
                body = {"type": "unsubscribe", "topics": [topic]}
            case "disconnect":
                subscribed(me, [f"{topic}/{i}" for i in range(n)])
                route = "$disconnect"
            case _:
                raise ValueError(action)
        ledger = Ledger(invocations=1)
        self.sender.ledger = ledger
        try:
            with self.recorder.recording(ledger):
                if route == "$connect":
                    design.connect(me)
                elif route == "$disconnect":
                    design.disconnect(me)
                else:
                    assert body is not None
                    ledger.inbound_bytes.append(len(json.dumps(body).encode()))
                    design.frame(me, body)
        finally:
            self.sender.ledger = None
        return ledger


@contextmanager
def mocked_aws() -> Iterator[None]:
    """moto's in-process mock, with fake credentials: nothing leaves the process."""
    from moto import mock_aws

    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
    os.environ["AWS_ACCESS_KEY_ID"] = "testing"
    os.environ["AWS_SECRET_ACCESS_KEY"] = "testing"
    try:
        with mock_aws():
            yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def measure(actions: tuple[Action, ...] = ACTIONS) -> Json:
    """Every action on both designs: {action: {design: summary}}."""
    results: Json = {}
    with mocked_aws():
        bench = Bench()
        for action in actions:
            results[action.key] = {
                name: bench.run(name, action.key).summary() for name in ("original", "polysignal")
            }
            for summary in results[action.key].values():
                summary["dollarsPerMillionDelivered"] = (
                    round(summary["dollarsPerMillionTotal"] / action.per, 4)
                    if action.key.startswith("publish")
                    else None
                )
    return results


# --- the tables ---------------------------------------------------------------------------------


def _ops(summary: Json) -> str:
    short = {
        "BatchWriteItem": "Batch",
        "PutItem": "Put",
        "DeleteItem": "Delete",
        "UpdateItem": "Update",
        "Query": "Query",
        "GetItem": "Get",
    }
    parts = [f"{n} {short.get(op, op)}" for op, n in sorted(summary["operations"].items())]
    return ", ".join(parts) or "-"


def _num(value: float) -> str:
    return f"{value:g}" if value < 1000 else f"{value:,.0f}"


def _money(value: float) -> str:
    return f"{value:.3f}" if value < 10 else f"{value:.2f}"


def markdown(results: Json, prices: PriceList = PRICES, duration: DurationModel = DURATION) -> str:
    labels = {a.key: a for a in ACTIONS}
    counts = [
        "| action | design | DynamoDB calls | WRU (of which gs1) | RRU | Lambda inv. "
        "(billed ms) | API GW msgs |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    money = [
        "| action | original $/M | polysignal $/M | ratio | original $/M delivered | "
        "polysignal $/M delivered |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for key, row in results.items():
        label = labels[key].label if key in labels else key
        for name in ("original", "polysignal"):
            s = row[name]
            counts.append(
                f"| {label} | {name} | {_ops(s)} | {_num(s['writeUnits'])} "
                f"({_num(s['indexWriteUnits'])}) | {_num(s['readUnits'])} | "
                f"{s['lambdaInvocations']} ({_num(s['lambdaBilledMs'])}) | "
                f"{s['apiGatewayMessages']} |"
            )
        o, p = row["original"], row["polysignal"]
        ratio = p["dollarsPerMillionTotal"] / o["dollarsPerMillionTotal"]
        delivered = [
            _money(s["dollarsPerMillionDelivered"])
            if s.get("dollarsPerMillionDelivered") is not None
            else "-"
            for s in (o, p)
        ]
        money.append(
            f"| {label} | {_money(o['dollarsPerMillionTotal'])} | "
            f"{_money(p['dollarsPerMillionTotal'])} | {ratio:.2f}x | "
            f"{delivered[0]} | {delivered[1]} |"
        )
    gb_ms = prices.lambda_memory_mb / 1024
    notes = (
        f"Prices ({prices.region}, list prices as of {prices.as_of}): DynamoDB on-demand "
        f"${prices.dynamodb_write_per_million} per million write request units and "
        f"${prices.dynamodb_read_per_million} per million read request units; Lambda "
        f"${prices.lambda_request_per_million} per million requests and "
        f"${prices.lambda_gb_second} per GB-second (arm64) at {prices.lambda_memory_mb} MB "
        f"({gb_ms:g} GB), billed {duration.base_ms:g} ms + {duration.round_trip_ms:g} ms per "
        f"DynamoDB call and per {duration.post_concurrency} posts (an assumption: nothing is "
        f"timed); API Gateway WebSocket ${prices.api_message_per_million} per million messages "
        f"(per started 32 KB) and ${prices.api_connection_minute_per_million} per million "
        "connection-minutes (the same for both designs, not in the table)."
    )
    return "\n".join([*counts, "", *money, "", notes])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="also write the raw figures to this file")
    args = parser.parse_args(argv)
    started = time.monotonic()
    results = measure()
    text = markdown(results)
    print(text)
    if args.json:
        with open(args.json, "w") as out:
            json.dump(
                {
                    "prices": asdict(PRICES),
                    "duration": asdict(DURATION),
                    "actions": {a.key: a.label for a in ACTIONS},
                    "results": results,
                    "markdown": text,
                    "seconds": round(time.monotonic() - started, 2),
                },
                out,
                indent=1,
                default=lambda o: float(o) if isinstance(o, Decimal) else str(o),
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
