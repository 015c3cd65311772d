"""Posting to API Gateway connections (serverless/sender.py): a fan-out whose posts all fail
the same way logs one line per interval, not one per connection."""

from __future__ import annotations

import logging

import boto3
from botocore.config import Config

from polysignal.serverless.sender import ApiGatewaySender, Delivery

from support import free_port


def test_failing_posts_log_once_per_interval(caplog):
    caplog.set_level(logging.WARNING, "polysignal.serverless")
    client = boto3.client(
        "apigatewaymanagementapi",
        endpoint_url=f"http://127.0.0.1:{free_port()}",  # nothing listens there
        region_name="us-east-1",
        aws_access_key_id="test",
        aws_secret_access_key="test",
        config=Config(retries={"max_attempts": 1}, connect_timeout=1, read_timeout=1),
    )
    sender = ApiGatewaySender(client, concurrency=1)
    results = [sender.post(f"conn-{n}", b"{}") for n in range(5)]
    assert results == [Delivery.FAILED] * 5
    lines = [r.getMessage() for r in caplog.records if r.name == "polysignal.serverless"]
    assert len(lines) == 1, lines
    assert lines[0].startswith("post to conn-0 failed: Could not connect to the endpoint URL")
