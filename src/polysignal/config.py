"""One frozen Settings object, built from environment variables; CLI flags override.

Every setting is listed in ``FIELDS`` with its environment variable, default and a one-line
description; ``docs/configuration.md`` is generated from the same table so the two never drift
(``python -m polysignal config-table``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit


class ConfigError(ValueError):
    """A setting has a value that cannot be used; the message names the variable."""


class Secret:
    """A string that never prints: ``repr`` and ``str`` show stars, ``.reveal()`` the value."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __bool__(self) -> bool:
        return bool(self._value)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)

    def __repr__(self) -> str:
        return "Secret('**********')" if self._value else "Secret('')"

    __str__ = __repr__


def redact_url(url: str) -> str:
    """``redis://user:pw@host:6379/0`` -> ``redis://user:***@host:6379/0`` (for logs)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable url>"
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    user = parts.username or ""
    return urlunsplit((parts.scheme, f"{user}:***@{host}", parts.path, parts.query, ""))


def _parse_bool(name: str, raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise ConfigError(f"{name}: expected a boolean (1/0, true/false), got {raw!r}")


def _parse_int(name: str, raw: str) -> int:
    try:
        value = int(raw.strip())
    except ValueError:
        raise ConfigError(f"{name}: expected an integer, got {raw!r}") from None
    if value < 0:
        raise ConfigError(f"{name}: must not be negative, got {value}")
    return value


def _parse_float(name: str, raw: str) -> float:
    try:
        value = float(raw.strip())
    except ValueError:
        raise ConfigError(f"{name}: expected a number, got {raw!r}") from None
    if value < 0:
        raise ConfigError(f"{name}: must not be negative, got {value}")
    return value


def _parse_ice_servers(name: str, raw: str) -> tuple[dict[str, Any], ...]:
    try:
        value = json.loads(raw)
    except ValueError as exc:
        raise ConfigError(f"{name}: not valid JSON ({exc})") from None
    if isinstance(value, dict) and "iceServers" in value:
        value = value["iceServers"]
    if not isinstance(value, list) or not all(isinstance(s, dict) for s in value):
        raise ConfigError(f"{name}: expected a JSON list of RTCIceServer objects")
    return tuple(value)


@dataclass(frozen=True)
class Settings:
    """Every knob of a polysignal node. Build with ``Settings.from_env()``."""

    # --- server ---
    host: str = "0.0.0.0"
    port: int = 4444
    node_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    backend_url: str = "memory://"
    signal_channel: str = "signal:publish"
    log_level: str = "INFO"
    workers: int = 1
    shutdown_timeout: float = 5.0
    header_timeout: float = 10.0
    max_header_bytes: int = 16384
    max_headers: int = 100
    # --- shared limits ---
    max_frame_bytes: int = 65536
    max_topics_per_connection: int = 256
    max_topic_length: int = 512
    rate_limit: float = 200.0
    rate_burst: int = 400
    max_connections_per_ip: int = 1000
    send_buffer_bytes: int = 1 << 20
    ping_interval: float = 30.0
    # --- topics ---
    echo: bool = False
    # --- redis backend ---
    presence_ttl: int = 90
    presence_refresh: float = 10.0
    presence_cache_ttl: float = 2.0
    redis_backoff_max: float = 10.0
    # --- relay ---
    relay_buffer_bytes: int = 1 << 20
    relay_wait_timeout: float = 60.0
    relay_max_frame_bytes: int = 256 * 1024
    # --- signal-fire ---
    signalfire_path: str = "/signal-fire"
    session_timeout: float = 30.0
    ice_servers: tuple[dict[str, Any], ...] | None = None
    id_lease_ttl: int = 60
    # --- rooms ---
    app_secret: Secret = field(default_factory=lambda: Secret(""))
    app_pass: Secret = field(default_factory=lambda: Secret(""))
    token_lifetime: int = 86400
    max_payload_bytes: int = 16384
    rooms_dev: bool = False

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Read every variable of ``FIELDS`` from ``environ``; ``overrides`` (CLI flags) win.

        Raises ConfigError naming the variable when a value cannot be parsed.
        """
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for spec in FIELDS:
            raw = env.get(spec.env)
            if raw is not None and raw != "":
                values[spec.name] = spec.parse(spec.env, raw)
        # A REDIS_URL alone selects the redis backend (docs/configuration.md).
        if "backend_url" not in values and env.get("REDIS_URL"):
            values["backend_url"] = env["REDIS_URL"]
        values.update({k: v for k, v in overrides.items() if v is not None})
        settings = cls(**values)
        settings.validate()
        return settings

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)

    def validate(self) -> None:
        scheme = urlsplit(self.backend_url).scheme
        if scheme not in ("memory", "redis", "rediss", "unix"):
            raise ConfigError(
                f"BACKEND: unsupported scheme {scheme!r} (use memory:// or redis://host:port)"
            )
        if not 0 < self.port < 65536 and self.port != 0:
            raise ConfigError(f"PORT: {self.port} is not a TCP port")
        if self.workers < 1:
            raise ConfigError("WORKERS: must be at least 1")
        if self.workers > 1 and scheme == "memory":
            raise ConfigError(
                "--workers > 1 needs a shared backend: set BACKEND=redis://... (or REDIS_URL); "
                "workers on the memory backend could not see each other's peers"
            )
        if self.max_header_bytes < 1024:
            raise ConfigError("MAX_HEADER_BYTES: must be at least 1024")
        if self.max_headers < 1:
            raise ConfigError("MAX_HEADERS: must be at least 1")
        if self.max_frame_bytes < 1024:
            raise ConfigError("MAX_FRAME_BYTES: must be at least 1024")
        if self.relay_max_frame_bytes < 1024:
            raise ConfigError("RELAY_MAX_FRAME_BYTES: must be at least 1024")
        if self.relay_max_frame_bytes > min(self.relay_buffer_bytes, self.send_buffer_bytes):
            raise ConfigError(
                "RELAY_MAX_FRAME_BYTES: must not exceed RELAY_BUFFER_BYTES or SEND_BUFFER_BYTES, "
                "or one frame would overflow the buffers that hold it"
            )
        if not self.signalfire_path.startswith("/"):
            raise ConfigError("SIGNALFIRE_PATH: must start with '/'")

    @property
    def backend_scheme(self) -> str:
        return urlsplit(self.backend_url).scheme


@dataclass(frozen=True)
class FieldSpec:
    name: str
    env: str
    parse: Callable[[str, str], Any]
    doc: str
    group: str


def _str(_: str, raw: str) -> str:
    return raw


def _upper(_: str, raw: str) -> str:
    return raw.upper()


def _secret(_: str, raw: str) -> Secret:
    return Secret(raw)


FIELDS: tuple[FieldSpec, ...] = (
    FieldSpec("host", "HOST", _str, "Address to listen on.", "server"),
    FieldSpec("port", "PORT", _parse_int, "TCP port for every protocol.", "server"),
    FieldSpec("node_id", "NODE_ID", _str, "This node's id, stamped as `_origin`.", "server"),
    FieldSpec(
        "backend_url",
        "BACKEND",
        _str,
        "`memory://` (one process) or `redis://host:port/db`; a `REDIS_URL` alone selects Redis.",
        "server",
    ),
    FieldSpec("signal_channel", "SIGNAL_CHANNEL", _str, "Prefix of the Redis channels.", "server"),
    FieldSpec("log_level", "LOG_LEVEL", _upper, "DEBUG, INFO, WARNING or ERROR.", "server"),
    FieldSpec(
        "workers", "WORKERS", _parse_int, "Processes sharing the port (needs Redis).", "server"
    ),
    FieldSpec(
        "shutdown_timeout",
        "SHUTDOWN_TIMEOUT",
        _parse_float,
        "Seconds a graceful stop waits for peers to close.",
        "server",
    ),
    FieldSpec(
        "header_timeout",
        "HEADER_TIMEOUT",
        _parse_float,
        "Seconds a new connection has to send its whole request line and headers (else 408). "
        "0 = no limit.",
        "server",
    ),
    FieldSpec(
        "max_header_bytes",
        "MAX_HEADER_BYTES",
        _parse_int,
        "Largest request line and headers, together, in bytes (else 431).",
        "limits",
    ),
    FieldSpec(
        "max_headers",
        "MAX_HEADERS",
        _parse_int,
        "Most header lines in a request (else 431).",
        "limits",
    ),
    FieldSpec(
        "max_frame_bytes",
        "MAX_FRAME_BYTES",
        _parse_int,
        "Largest WebSocket frame accepted; larger closes with 1009.",
        "limits",
    ),
    FieldSpec(
        "max_topics_per_connection",
        "MAX_TOPICS_PER_CONNECTION",
        _parse_int,
        "Topics (or document ids) one connection may hold.",
        "limits",
    ),
    FieldSpec(
        "max_topic_length",
        "MAX_TOPIC_LENGTH",
        _parse_int,
        "Longest topic, document id or peer id, in characters.",
        "limits",
    ),
    FieldSpec(
        "rate_limit",
        "RATE_LIMIT",
        _parse_float,
        "Messages per second one connection may send (token bucket refill).",
        "limits",
    ),
    FieldSpec("rate_burst", "RATE_BURST", _parse_int, "Token bucket size.", "limits"),
    FieldSpec(
        "max_connections_per_ip",
        "MAX_CONNECTIONS_PER_IP",
        _parse_int,
        "Open WebSockets per client address; 0 = unlimited.",
        "limits",
    ),
    FieldSpec(
        "send_buffer_bytes",
        "SEND_BUFFER_BYTES",
        _parse_int,
        "Unsent bytes a connection may queue before it is closed with 1013.",
        "limits",
    ),
    FieldSpec(
        "ping_interval",
        "PING_INTERVAL",
        _parse_float,
        "Seconds between WebSocket pings; a peer silent (no pong) for one interval is closed. "
        "0 = off.",
        "limits",
    ),
    FieldSpec(
        "echo", "ECHO", _parse_bool, "Topics: also deliver a publish to its sender.", "topics"
    ),
    FieldSpec(
        "presence_ttl",
        "PRESENCE_TTL",
        _parse_int,
        "Seconds a node's presence counts live in Redis unless refreshed.",
        "redis",
    ),
    FieldSpec(
        "presence_refresh",
        "PRESENCE_REFRESH",
        _parse_float,
        "Seconds between presence TTL refreshes.",
        "redis",
    ),
    FieldSpec(
        "presence_cache_ttl",
        "PRESENCE_CACHE_TTL",
        _parse_float,
        "Longest a cached cluster-wide `clients` count is used without re-reading Redis.",
        "redis",
    ),
    FieldSpec(
        "redis_backoff_max",
        "REDIS_BACKOFF_MAX",
        _parse_float,
        "Cap, in seconds, of the reconnect backoff.",
        "redis",
    ),
    FieldSpec(
        "relay_buffer_bytes",
        "RELAY_BUFFER_BYTES",
        _parse_int,
        "Bytes a held `/connection` socket may send before its peer arrives.",
        "relay",
    ),
    FieldSpec(
        "relay_wait_timeout",
        "RELAY_WAIT_TIMEOUT",
        _parse_float,
        "Seconds a `/connection` socket is held waiting for its peer.",
        "relay",
    ),
    FieldSpec(
        "relay_max_frame_bytes",
        "RELAY_MAX_FRAME_BYTES",
        _parse_int,
        "Largest frame on a `/connection` pipe (document sync); larger closes with 1009.",
        "relay",
    ),
    FieldSpec(
        "signalfire_path",
        "SIGNALFIRE_PATH",
        _str,
        "Path where any WebSocket speaks Signal-Fire, with or without subprotocol.",
        "signal-fire",
    ),
    FieldSpec(
        "session_timeout",
        "SESSION_TIMEOUT",
        _parse_float,
        "Seconds before an unanswered `session-start` times out.",
        "signal-fire",
    ),
    FieldSpec(
        "ice_servers",
        "ICE_SERVERS",
        _parse_ice_servers,
        "JSON list of RTCIceServer objects handed to clients (Signal-Fire welcome, demo).",
        "signal-fire",
    ),
    FieldSpec(
        "id_lease_ttl",
        "ID_LEASE_TTL",
        _parse_int,
        "Seconds a claimed peer id (or rooms room name) lives in the cluster registry unless "
        "renewed.",
        "signal-fire",
    ),
    FieldSpec("app_secret", "APP_SECRET", _secret, "HMAC key of the rooms tokens.", "rooms"),
    FieldSpec("app_pass", "APP_PASS", _secret, "Password `POST /app` requires.", "rooms"),
    FieldSpec(
        "token_lifetime",
        "TOKEN_LIFETIME",
        _parse_int,
        "Seconds a rooms session token is valid.",
        "rooms",
    ),
    FieldSpec(
        "max_payload_bytes",
        "MAX_PAYLOAD_BYTES",
        _parse_int,
        "Largest `payload` of a rooms event, as JSON bytes.",
        "rooms",
    ),
    FieldSpec(
        "rooms_dev",
        "ROOMS_DEV",
        _parse_bool,
        "Run the rooms protocol with printed development secrets when unset.",
        "rooms",
    ),
)


CONFIG_DOC_HEADER = """# Configuration

Every setting of polysignal, as an environment variable; each is also a flag of `polysignal serve`
(`MAX_FRAME_BYTES` -> `--max-frame-bytes`; booleans are bare flags: `--echo`). Flags win over the
environment. Invalid values stop the server at start with a message naming the variable.
This page is generated by `polysignal config-table > docs/configuration.md`; a test keeps it in
step with the code.

"""


def config_table() -> str:
    """docs/configuration.md: the Markdown table of every setting with its default."""
    defaults = Settings(node_id="<random UUID>")
    lines = ["| variable | default | group | meaning |", "|---|---|---|---|"]
    for spec in FIELDS:
        value = getattr(defaults, spec.name)
        if isinstance(value, Secret) or value is None:
            shown = "(unset)"
        elif isinstance(value, bool):
            shown = "1" if value else "0"
        else:
            shown = str(value)
        lines.append(f"| `{spec.env}` | `{shown}` | {spec.group} | {spec.doc} |")
    lines.append(
        "| `REDIS_URL` | (unset) | server | Redis URL; selects the Redis backend when "
        "`BACKEND` is unset. |"
    )
    return CONFIG_DOC_HEADER + "\n".join(lines) + "\n"
