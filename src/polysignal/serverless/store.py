"""Topic subscriptions in one DynamoDB table (docs/serverless.md, "Table design").

One item per (topic, connection):

| attribute | value | role |
|---|---|---|
| `pk` | `TOPIC-{topic}` | hash key: a topic's subscribers are one Query |
| `sk` | `CONNECTION-{connectionId}` | range key; hash key of the GSI `gs1` |
| `data` | `{topic}` | range key of `gs1` |
| `ttl` | epoch seconds | DynamoDB TTL: abandoned subscriptions expire |

``data`` is always written: the original's first generation left it out, so its items never entered
the sparse index ``gs1`` and disconnect cleanup found nothing. ``ttl`` is moved forward by the
connection's activity; DynamoDB deletes expired items lazily (within days), so every read also
filters them out by time.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, cast

if TYPE_CHECKING:
    from mypy_boto3_dynamodb.client import DynamoDBClient
    from mypy_boto3_dynamodb.type_defs import WriteRequestTypeDef

log = logging.getLogger("polysignal.serverless")

TOPIC_PREFIX: Final = "TOPIC-"
CONNECTION_PREFIX: Final = "CONNECTION-"
INDEX_NAME: Final = "gs1"
TTL_ATTRIBUTE: Final = "ttl"
# BatchWriteItem takes at most 25 requests.
BATCH_SIZE: Final = 25
# `data` (the topic) is gs1's range key, and DynamoDB caps range keys at 1024 bytes.
MAX_TOPIC_BYTES: Final = 1024
# Bounds on loops that talk to DynamoDB: pages of one Query, retries of unprocessed batch items.
MAX_PAGES: Final = 1000
MAX_BATCH_ATTEMPTS: Final = 8
NO_EXPIRY: Final = 2**62

# The table as template.yaml declares it (a test compares the two); used by
# `polysignal serverless-local --create-table`.
TABLE_DEFINITION: Final[dict[str, Any]] = {
    "AttributeDefinitions": [
        {"AttributeName": "pk", "AttributeType": "S"},
        {"AttributeName": "sk", "AttributeType": "S"},
        {"AttributeName": "data", "AttributeType": "S"},
    ],
    "KeySchema": [
        {"AttributeName": "pk", "KeyType": "HASH"},
        {"AttributeName": "sk", "KeyType": "RANGE"},
    ],
    "GlobalSecondaryIndexes": [
        {
            "IndexName": INDEX_NAME,
            "KeySchema": [
                {"AttributeName": "sk", "KeyType": "HASH"},
                {"AttributeName": "data", "KeyType": "RANGE"},
            ],
            "Projection": {"ProjectionType": "ALL"},
        }
    ],
    "BillingMode": "PAY_PER_REQUEST",
}


class StoreError(RuntimeError):
    """DynamoDB did not accept a write after every retry."""


@dataclass(frozen=True, slots=True)
class Subscription:
    """One (topic, connection) item as read back."""

    topic: str
    connection_id: str
    expires: int


def topic_key(topic: str) -> str:
    return TOPIC_PREFIX + topic


def connection_key(connection_id: str) -> str:
    return CONNECTION_PREFIX + connection_id


class SubscriptionStore:
    """Reads and writes of the subscriptions table; every method is one logical operation."""

    def __init__(self, client: DynamoDBClient, table: str, ttl: int) -> None:
        self.client = client
        self.table = table
        self.ttl = ttl

    # --- writes ---
    def add(self, connection_id: str, topics: Iterable[str], now: float) -> None:
        """Put one item per topic (overwriting, so the TTL restarts), 25 per batch."""
        expires = str(int(now) + self.ttl)
        sk = connection_key(connection_id)
        self._batch_write(
            {
                "PutRequest": {
                    "Item": {
                        "pk": {"S": topic_key(topic)},
                        "sk": {"S": sk},
                        "data": {"S": topic},
                        TTL_ATTRIBUTE: {"N": expires},
                    }
                }
            }
            for topic in _unique(topics)
        )

    def remove(self, connection_id: str, topics: Iterable[str]) -> None:
        """Delete the (topic, connection) items; topics not held are no-ops."""
        sk = connection_key(connection_id)
        self._batch_write(
            {"DeleteRequest": {"Key": {"pk": {"S": topic_key(topic)}, "sk": {"S": sk}}}}
            for topic in _unique(topics)
        )

    def drop_connection(self, connection_id: str) -> list[str]:
        """Delete every subscription of a connection, found through ``gs1``; return the topics."""
        topics = [sub.topic for sub in self.topics_of(connection_id)]
        self.remove(connection_id, topics)
        return topics

    def refresh(self, subscriptions: Iterable[Subscription], now: float) -> int:
        """Move the TTL of ``subscriptions`` forward; return how many items still existed.

        A conditional update rather than a put, so an item deleted meanwhile (an unsubscribe
        handled by a concurrent invocation) is not brought back.
        """
        expires = str(int(now) + self.ttl)
        refreshed = 0
        for sub in subscriptions:
            try:
                self.client.update_item(
                    TableName=self.table,
                    Key={
                        "pk": {"S": topic_key(sub.topic)},
                        "sk": {"S": connection_key(sub.connection_id)},
                    },
                    UpdateExpression="SET #ttl = :expires",
                    ConditionExpression="attribute_exists(pk)",
                    ExpressionAttributeNames={"#ttl": TTL_ATTRIBUTE},
                    ExpressionAttributeValues={":expires": {"N": expires}},
                )
            except self.client.exceptions.ConditionalCheckFailedException:
                continue
            refreshed += 1
        return refreshed

    # --- reads ---
    def subscribers(self, topic: str, now: float) -> list[str]:
        """Connection ids subscribed to ``topic`` whose subscription has not expired.

        A strongly consistent read, so a subscribe acknowledged a moment ago is seen.
        """
        live: list[str] = []
        for item in self._query(
            KeyConditionExpression="pk = :pk AND begins_with(sk, :prefix)",
            ExpressionAttributeValues={
                ":pk": {"S": topic_key(topic)},
                ":prefix": {"S": CONNECTION_PREFIX},
            },
            ProjectionExpression="sk, #ttl",
            ExpressionAttributeNames={"#ttl": TTL_ATTRIBUTE},
            ConsistentRead=True,
        ):
            if _expires(item) > now:
                live.append(item["sk"]["S"][len(CONNECTION_PREFIX) :])
        return live

    def topics_of(self, connection_id: str) -> list[Subscription]:
        """Every subscription item of a connection, expired or not, through the GSI ``gs1``.

        GSIs are eventually consistent: a subscription written a moment ago may be missing.
        """
        subs: list[Subscription] = []
        for item in self._query(
            IndexName=INDEX_NAME,
            KeyConditionExpression="sk = :sk",
            ExpressionAttributeValues={":sk": {"S": connection_key(connection_id)}},
        ):
            topic = item.get("data", {}).get("S")
            if topic is None:  # an item written without `data` would not be in gs1 at all
                continue
            subs.append(Subscription(topic, connection_id, _expires(item)))
        return subs

    # --- local development ---
    def create_table(self) -> bool:
        """Create the table as template.yaml declares it, with TTL on; False if it exists."""
        client = self.client
        try:
            client.create_table(TableName=self.table, **TABLE_DEFINITION)
        except client.exceptions.ResourceInUseException:
            return False
        client.get_waiter("table_exists").wait(
            TableName=self.table, WaiterConfig={"Delay": 1, "MaxAttempts": 30}
        )
        client.update_time_to_live(
            TableName=self.table,
            TimeToLiveSpecification={"Enabled": True, "AttributeName": TTL_ATTRIBUTE},
        )
        return True

    # --- helpers ---
    def _query(self, **kwargs: Any) -> Iterator[dict[str, Any]]:
        for _ in range(MAX_PAGES):
            page = self.client.query(TableName=self.table, **kwargs)
            yield from page.get("Items", [])
            start = page.get("LastEvaluatedKey")
            if not start:
                return
            kwargs["ExclusiveStartKey"] = start
        log.warning("query on %s stopped after %d pages", self.table, MAX_PAGES)

    def _batch_write(self, requests: Iterable[WriteRequestTypeDef]) -> None:
        batch: list[WriteRequestTypeDef] = []
        for request in requests:
            batch.append(request)
            if len(batch) == BATCH_SIZE:
                self._write_batch(batch)
                batch = []
        if batch:
            self._write_batch(batch)

    def _write_batch(self, batch: list[WriteRequestTypeDef]) -> None:
        pending = batch
        for attempt in range(MAX_BATCH_ATTEMPTS):
            result = self.client.batch_write_item(RequestItems={self.table: pending})
            # The unprocessed requests are given back in the shape they were sent.
            pending = cast(
                "list[WriteRequestTypeDef]", result.get("UnprocessedItems", {}).get(self.table, [])
            )
            if not pending:
                return
            # Throttled: back off before retrying only what was not written (AWS guidance).
            time.sleep(min(1.0, 0.05 * 2**attempt))
        raise StoreError(f"{len(pending)} write(s) to {self.table} unprocessed after retries")


def _expires(item: dict[str, Any]) -> int:
    """The item's TTL; an item without one (written by hand or by the original) never expires."""
    raw = item.get(TTL_ATTRIBUTE, {}).get("N")
    try:
        return int(raw) if raw is not None else NO_EXPIRY
    except ValueError:
        return NO_EXPIRY


def _unique(topics: Iterable[str]) -> list[str]:
    """Order-preserving dedupe: one batch may not name the same key twice."""
    return list(dict.fromkeys(topics))
