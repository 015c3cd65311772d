"""boto3 clients for the serverless shape; boto3 is imported here only, when a client is made.

The Lambda runtime ships boto3; the server never needs it (it is the ``serverless`` extra).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from polysignal.serverless.settings import ServerlessSettings

if TYPE_CHECKING:
    import boto3
    from mypy_boto3_apigatewaymanagementapi.client import ApiGatewayManagementApiClient
    from mypy_boto3_dynamodb.client import DynamoDBClient


def _session(settings: ServerlessSettings) -> boto3.session.Session:
    import boto3

    def reveal(value: Any) -> str | None:
        return value.reveal() if value is not None else None

    return boto3.session.Session(
        aws_access_key_id=reveal(settings.access_key_id),
        aws_secret_access_key=reveal(settings.secret_access_key),
        aws_session_token=reveal(settings.session_token),
        region_name=settings.region,
    )


def _config(pool: int) -> Any:
    from botocore.config import Config

    return Config(
        connect_timeout=3,
        read_timeout=10,
        retries={"max_attempts": 3, "mode": "standard"},
        max_pool_connections=max(10, pool),
    )


def dynamodb_client(settings: ServerlessSettings) -> DynamoDBClient:
    return _session(settings).client(
        "dynamodb",
        endpoint_url=settings.dynamodb_endpoint,
        config=_config(settings.fanout_concurrency),
    )


def management_client(settings: ServerlessSettings, endpoint: str) -> ApiGatewayManagementApiClient:
    from botocore.config import Config

    # One retry at most: a post is part of a fan-out that should not stall on one peer.
    config = _config(settings.fanout_concurrency).merge(
        Config(retries={"max_attempts": 2, "mode": "standard"}, read_timeout=5)
    )
    return _session(settings).client(
        "apigatewaymanagementapi", endpoint_url=endpoint, config=config
    )
