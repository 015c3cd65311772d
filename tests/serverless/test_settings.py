"""The serverless shape's settings: defaults of the original, shared limits, loud failures."""

from __future__ import annotations

import pytest

from polysignal.config import ConfigError
from polysignal.serverless.settings import SERVERLESS_FIELDS, ServerlessSettings

from support import ROOT


def test_defaults_match_the_original():
    s = ServerlessSettings.from_env({})
    assert (s.table_name, s.region, s.dynamodb_endpoint, s.echo) == (
        "Database",
        "us-east-1",
        None,
        False,
    )
    assert s.max_frame_bytes == 65536 and s.max_topic_length == 512


def test_environment_is_read():
    s = ServerlessSettings.from_env(
        {
            "TABLE_NAME": "Signals",
            "AWS_DEFAULT_REGION": "eu-west-1",
            "AWS_DYNAMODB_ENDPOINT": "http://127.0.0.1:8000",
            "ECHO": "1",
            "MAX_TOPICS_PER_CONNECTION": "7",
            "SUBSCRIPTION_TTL": "900",
            "SUBSCRIPTION_REFRESH": "60",
            "AWS_LAMBDA_FUNCTION_NAME": "fn",
        }
    )
    assert (s.table_name, s.region, s.dynamodb_endpoint) == (
        "Signals",
        "eu-west-1",
        "http://127.0.0.1:8000",
    )
    assert (s.echo, s.max_topics_per_connection, s.subscription_ttl, s.origin) == (
        True,
        7,
        900,
        "fn",
    )
    # AWS_REGION wins over AWS_DEFAULT_REGION, NODE_ID over the function name.
    s = ServerlessSettings.from_env(
        {"AWS_REGION": "ap-south-1", "AWS_DEFAULT_REGION": "eu-west-1", "NODE_ID": "n1"}
        | {"AWS_LAMBDA_FUNCTION_NAME": "fn"}
    )
    assert (s.region, s.origin) == ("ap-south-1", "n1")


def test_credentials_never_print():
    s = ServerlessSettings.from_env({"AWS_SECRET_ACCESS_KEY": "very-secret-key"})
    assert "very-secret-key" not in repr(s)
    assert s.secret_access_key is not None and s.secret_access_key.reveal() == "very-secret-key"


@pytest.mark.parametrize(
    ("env", "needle"),
    [
        ({"SUBSCRIPTION_TTL": "10"}, "SUBSCRIPTION_TTL"),
        ({"SUBSCRIPTION_TTL": "600", "SUBSCRIPTION_REFRESH": "600"}, "SUBSCRIPTION_REFRESH"),
        ({"SUBSCRIPTION_TTL": "x"}, "SUBSCRIPTION_TTL"),
        ({"FANOUT_CONCURRENCY": "0"}, "FANOUT_CONCURRENCY"),
        ({"ECHO": "perhaps"}, "ECHO"),
        ({"MAX_FRAME_BYTES": "12"}, "MAX_FRAME_BYTES"),
    ],
)
def test_bad_values_fail_loudly(env, needle):
    with pytest.raises(ConfigError, match=needle):
        ServerlessSettings.from_env(env)


def test_every_variable_is_documented():
    page = (ROOT / "docs" / "serverless.md").read_text()
    for spec in SERVERLESS_FIELDS:
        assert f"`{spec.env}`" in page, spec.env
