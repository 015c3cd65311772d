"""Settings of the serverless shape, from the Lambda's environment variables.

The protocol limits are the server's own (``Settings``: ``ECHO``, ``MAX_FRAME_BYTES``,
``MAX_TOPICS_PER_CONNECTION``, ``MAX_TOPIC_LENGTH``, ``LOG_LEVEL``); what only the AWS shape needs
is listed in ``SERVERLESS_FIELDS`` and documented in docs/serverless.md.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from polysignal.config import (
    ConfigError,
    FieldSpec,
    Secret,
    Settings,
    fields_of,
    parse_optional,
    parse_upper,
    setting,
)


@dataclass(frozen=True)
class ServerlessSettings:
    """Everything the Lambda handler reads from its environment, parsed once per cold start."""

    table_name: str = setting("Database", "TABLE_NAME", "DynamoDB table of subscriptions.")
    region: str = setting(
        "us-east-1", "AWS_REGION", "AWS region of the table and the WebSocket API."
    )
    dynamodb_endpoint: str | None = setting(
        None,
        "AWS_DYNAMODB_ENDPOINT",
        "DynamoDB endpoint URL instead of AWS's (DynamoDB Local, moto, localstack).",
        parse=parse_optional,
    )
    management_endpoint: str | None = setting(
        None,
        "AWS_APIGATEWAY_MANAGEMENT_ENDPOINT",
        "API Gateway Management API URL instead of `https://{apiId}.execute-api.{region}"
        ".amazonaws.com/{stage}` (tests, proxies).",
        parse=parse_optional,
    )
    subscription_ttl: int = setting(
        3600,
        "SUBSCRIPTION_TTL",
        "Seconds a subscription lives after its connection's last activity (TTL attribute).",
    )
    subscription_refresh: int = setting(
        600,
        "SUBSCRIPTION_REFRESH",
        "Activity rewrites a connection's TTLs when they are this many seconds old.",
    )
    fanout_concurrency: int = setting(
        16, "FANOUT_CONCURRENCY", "Parallel `PostToConnection` calls of one publish."
    )
    origin: str = setting(
        "polysignal-serverless", "NODE_ID", "`_origin` of publishes (default: the function name)."
    )
    log_level: str = setting(
        "INFO", "LOG_LEVEL", "DEBUG, INFO, WARNING or ERROR.", parse=parse_upper
    )
    # Shared with the server (config.Settings): the same limits and publish semantics.
    echo: bool = False
    max_frame_bytes: int = 65536
    max_topics_per_connection: int = 256
    max_topic_length: int = 512
    # Taken from the environment only so an explicit mapping (tests, local mode) is honoured;
    # None lets boto3 use its usual credential chain.
    access_key_id: Secret | None = field(default=None, repr=False)
    secret_access_key: Secret | None = field(default=None, repr=False)
    session_token: Secret | None = field(default=None, repr=False)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ServerlessSettings:
        """Read the serverless settings and the server's shared limits; raise ConfigError."""
        env = os.environ if environ is None else environ
        shared = Settings.from_env({k: v for k, v in env.items() if k in _SHARED_ENV})
        values: dict[str, object] = {
            "echo": shared.topics.echo,
            "max_frame_bytes": shared.limits.max_frame_bytes,
            "max_topics_per_connection": shared.topics.max_topics_per_connection,
            "max_topic_length": shared.topics.max_topic_length,
        }
        function_name = env.get("AWS_LAMBDA_FUNCTION_NAME")
        if function_name:
            values["origin"] = function_name
        if env.get("AWS_DEFAULT_REGION"):
            values["region"] = env["AWS_DEFAULT_REGION"]
        for spec in SERVERLESS_FIELDS:
            raw = env.get(spec.env)
            if raw is not None and raw != "":
                values[spec.name] = spec.parse(spec.env, raw)
        for name, var in (
            ("access_key_id", "AWS_ACCESS_KEY_ID"),
            ("secret_access_key", "AWS_SECRET_ACCESS_KEY"),
            ("session_token", "AWS_SESSION_TOKEN"),
        ):
            if env.get(var):
                values[name] = Secret(env[var])
        settings = cls(**values)  # type: ignore[arg-type]
        settings.validate()
        return settings

    def validate(self) -> None:
        if not self.table_name:
            raise ConfigError("TABLE_NAME: must not be empty")
        if self.subscription_ttl < 60:
            raise ConfigError("SUBSCRIPTION_TTL: must be at least 60 seconds")
        if not 0 < self.subscription_refresh < self.subscription_ttl:
            raise ConfigError("SUBSCRIPTION_REFRESH: must be between 1 and SUBSCRIPTION_TTL - 1")
        if self.fanout_concurrency < 1:
            raise ConfigError("FANOUT_CONCURRENCY: must be at least 1")


_SHARED_ENV = frozenset(
    {"ECHO", "MAX_FRAME_BYTES", "MAX_TOPICS_PER_CONNECTION", "MAX_TOPIC_LENGTH"}
)


SERVERLESS_FIELDS: tuple[FieldSpec, ...] = fields_of(ServerlessSettings, "serverless")
"""What only the AWS shape reads from its environment (docs/serverless.md)."""
