"""Sending to API Gateway WebSocket connections (the Management API's ``PostToConnection``).

A send has three outcomes: sent, gone (HTTP 410: the connection no longer exists, so the
caller removes its subscriptions: docs/serverless.md), or failed (anything else: logged, and
never fatal for the rest of a fan-out).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from enum import Enum
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from mypy_boto3_apigatewaymanagementapi.client import ApiGatewayManagementApiClient

from polysignal.throttle import Throttle, more

log = logging.getLogger("polysignal.serverless")


class Delivery(Enum):
    SENT = "sent"
    GONE = "gone"
    FAILED = "failed"


class Sender(Protocol):
    """Where the handler's frames go: API Gateway in AWS, the local server's sockets locally."""

    # How many posts of one fan-out may run at once (1 = one after another).
    concurrency: int

    def post(self, connection_id: str, data: bytes) -> Delivery: ...


class ApiGatewaySender:
    """``PostToConnection`` through one Management API endpoint (one API stage)."""

    def __init__(self, client: ApiGatewayManagementApiClient, concurrency: int) -> None:
        self.client = client
        self.concurrency = concurrency
        # A fan-out whose posts fail alike logs one line per interval (with the count held).
        self.throttle = Throttle()

    def post(self, connection_id: str, data: bytes) -> Delivery:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.post_to_connection(ConnectionId=connection_id, Data=data)
        except self.client.exceptions.GoneException:
            return Delivery.GONE
        except ClientError as exc:
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if status == 410:
                return Delivery.GONE
            code = exc.response.get("Error", {}).get("Code", "?")
            held = self.throttle.allow(("http", status, code))
            if held is not None:
                log.warning(
                    "post to %s failed: HTTP %s %s%s", connection_id, status, code, more(held)
                )
            return Delivery.FAILED
        except BotoCoreError as exc:  # connection errors, timeouts
            held = self.throttle.allow(type(exc).__name__)
            if held is not None:
                log.warning("post to %s failed: %s%s", connection_id, exc, more(held))
            return Delivery.FAILED
        return Delivery.SENT


def management_endpoint(request_context: Mapping[str, Any], region: str) -> str | None:
    """The Management API URL of the API stage an event came from.

    Built from ``apiId`` and ``stage`` (as the original does) rather than ``domainName``, so it is
    right behind a custom domain too, whose base path mapping may hide the stage.
    """
    api_id = request_context.get("apiId")
    stage = request_context.get("stage")
    if not isinstance(api_id, str) or not isinstance(stage, str) or not api_id or not stage:
        return None
    return f"https://{api_id}.execute-api.{region}.amazonaws.com/{stage}"


def fan_out(
    sender: Sender,
    targets: list[str],
    data: bytes,
    executor: Callable[[], ThreadPoolExecutor] | None = None,
) -> list[str]:
    """Post ``data`` to every target; return the ids that are gone.

    Posts run ``sender.concurrency`` at a time on the executor the callable returns, so a
    publish to 100 subscribers takes a few round trips, not 100.
    """

    def post(connection_id: str) -> Delivery:
        return sender.post(connection_id, data)

    if executor is None or sender.concurrency <= 1 or len(targets) <= 1:
        results = [post(target) for target in targets]
    else:
        results = list(executor().map(post, targets))
    return [t for t, r in zip(targets, results, strict=True) if r is Delivery.GONE]
