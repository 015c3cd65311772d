"""Fixtures of the serverless tests: a real DynamoDB-compatible endpoint (moto in server mode on
127.0.0.1), the table created exactly as template.yaml declares it, and a local HTTP endpoint
standing in for the API Gateway Management API that records every ``PostToConnection``.

Nothing here can reach AWS: credentials are fake, both endpoints are loopback, and the instance
metadata service is disabled.
"""

from __future__ import annotations

import base64
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import boto3
import pytest
from moto.server import ThreadedMotoServer

from polysignal.serverless import build_handler
from polysignal.serverless.service import SignalingHandler
from serverless.awslocal import (
    FAKE_CREDENTIALS,
    REGION,
    Client,
    LocalServer,
    ManagementApi,
    create_table_kwargs,
    load_template,
    running_local,
    scan_items,
    table_resource,
)

from support import free_port


@pytest.fixture(autouse=True)
def no_real_aws(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fake credentials, no config files, no instance metadata: boto3 cannot find AWS."""
    for key, value in FAKE_CREDENTIALS.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/aws-config")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/aws-credentials")
    monkeypatch.delenv("AWS_PROFILE", raising=False)


# --- template.yaml --------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def template() -> dict[str, Any]:
    return load_template()


# --- moto -----------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def moto_url() -> Iterator[str]:
    """moto in server mode on a free loopback port, for the whole session."""
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture
def dynamodb(moto_url: str) -> Any:
    return boto3.client(
        "dynamodb",
        endpoint_url=moto_url,
        region_name=REGION,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )


@pytest.fixture
def table(dynamodb: Any, template: dict[str, Any]) -> Iterator[str]:
    """A fresh table, named unlike the default, created as template.yaml declares it."""
    name = f"polysignal-{uuid.uuid4().hex[:12]}"
    dynamodb.create_table(TableName=name, **create_table_kwargs(template))
    ttl = table_resource(template)["TimeToLiveSpecification"]
    dynamodb.update_time_to_live(
        TableName=name,
        TimeToLiveSpecification={"AttributeName": ttl["AttributeName"], "Enabled": ttl["Enabled"]},
    )
    try:
        yield name
    finally:
        dynamodb.delete_table(TableName=name)


@pytest.fixture
def items(dynamodb: Any, table: str) -> Callable[[], list[dict[str, Any]]]:
    """Every item of the table, as DynamoDB attribute maps."""
    return lambda: scan_items(dynamodb, table)


# --- the API Gateway Management API stand-in ------------------------------------------------------


@pytest.fixture
def management() -> Iterator[ManagementApi]:
    api = ManagementApi()
    api.thread.start()
    try:
        yield api
    finally:
        api.server.shutdown()
        api.server.server_close()
        api.thread.join(5)


# --- the handler under test -----------------------------------------------------------------------


@pytest.fixture
def lambda_env(moto_url: str, table: str, management: ManagementApi) -> dict[str, str]:
    """The Lambda's environment: this table, moto, the recording Management API."""
    return {
        **FAKE_CREDENTIALS,
        "AWS_REGION": REGION,
        "TABLE_NAME": table,
        "AWS_DYNAMODB_ENDPOINT": moto_url,
        "AWS_APIGATEWAY_MANAGEMENT_ENDPOINT": management.url,
        "LOG_LEVEL": "WARNING",
    }


@pytest.fixture
def make_handler(lambda_env: dict[str, str]) -> Iterator[Callable[..., SignalingHandler]]:
    """Build handlers from ``lambda_env`` plus overrides; closed after the test."""
    made: list[SignalingHandler] = []

    def make(**overrides: str) -> SignalingHandler:
        handler = build_handler({**lambda_env, **overrides})
        made.append(handler)
        return handler

    yield make
    for handler in made:
        handler.close()


@pytest.fixture
def handler(make_handler: Callable[..., SignalingHandler]) -> SignalingHandler:
    return make_handler()


@pytest.fixture
def clients(handler: SignalingHandler, management: ManagementApi) -> Callable[[int], list[Client]]:
    """``clients(n)``: n connected clients with API Gateway-like ids."""

    def make(count: int) -> list[Client]:
        ids = [base64.b64encode(uuid.uuid4().bytes[:11]).decode() for _ in range(count)]
        return [Client(handler, management, cid).connect() for cid in ids]

    return make


@pytest.fixture
async def local(lambda_env: dict[str, str]) -> AsyncIterator[LocalServer]:
    """``serverless-local`` on a free port, on moto's DynamoDB and this test's table."""
    async with running_local(lambda_env) as server:
        yield server
