"""Settings: frozen groups, one per concern, each field declared once.

A field is declared with ``setting(default, ENV_NAME, doc)`` in its group; the environment
variable, the ``polysignal serve`` flag (``MAX_FRAME_BYTES`` -> ``--max-frame-bytes``) and the row
of ``docs/configuration.md`` (``polysignal config-table``, kept in step by a test) are all derived
from that one declaration. ``Settings`` holds one instance of each group; a part of the server
receives only the group it needs.

Field names are unique across groups, so ``Settings.of(max_frame_bytes=1024)`` and
``settings.replace(port=0)`` can name a field without its group.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import os
import re
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, get_type_hints
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from polysignal.core.auth import JwtVerifier


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


_SECRET_PARAMETERS = ("pass", "pwd", "secret", "token", "auth", "credential")
"""A URL query parameter whose name contains one of these carries a secret (redis-py reads
``?password=`` as the password)."""


def redact_url(url: str) -> str:
    """``url`` as logs and error messages show it: every credential replaced by ``***``.

    The password of ``user:password@`` and the value of every query parameter that carries a
    secret (``?password=``, ``?token=``, ...); the rest is kept verbatim:
    ``redis://u:pw@h:6379/0?password=pw&db=1`` -> ``redis://u:***@h:6379/0?password=***&db=1``.
    The one function for it: every log line and message that shows the backend URL uses it.
    """
    urls = split_backend_urls(url)
    if len(urls) > 1:  # standalone shards: each URL redacted on its own
        return ",".join(map(redact_url, urls))
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable url>"
    userinfo, at, hostport = parts.netloc.rpartition("@")
    netloc = parts.netloc
    if at and ":" in userinfo:
        netloc = f"{userinfo.partition(':')[0]}:***@{hostport}"
    shown = f"{parts.scheme}:" if parts.scheme else ""
    if url[len(shown) :].startswith("//"):
        shown += "//"
    shown += netloc + parts.path
    if parts.query:
        shown += "?" + "&".join(_redact_parameter(item) for item in parts.query.split("&"))
    return shown


def _redact_parameter(item: str) -> str:
    name, eq, _ = item.partition("=")
    if eq and any(word in name.lower() for word in _SECRET_PARAMETERS):
        return f"{name}=***"
    return item


# --- parsing ------------------------------------------------------------------------------------

Parser = Callable[[str, str], Any]


def parse_bool(name: str, raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise ConfigError(f"{name}: expected a boolean (1/0, true/false), got {raw!r}")


def parse_int(name: str, raw: str) -> int:
    try:
        value = int(raw.strip())
    except ValueError:
        raise ConfigError(f"{name}: expected an integer, got {raw!r}") from None
    if value < 0:
        raise ConfigError(f"{name}: must not be negative, got {value}")
    return value


def parse_float(name: str, raw: str) -> float:
    try:
        value = float(raw.strip())
    except ValueError:
        raise ConfigError(f"{name}: expected a number, got {raw!r}") from None
    if value < 0:
        raise ConfigError(f"{name}: must not be negative, got {value}")
    return value


def parse_text(_: str, raw: str) -> str:
    return raw


def parse_upper(_: str, raw: str) -> str:
    return raw.upper()


def parse_secret(_: str, raw: str) -> Secret:
    return Secret(raw)


def parse_optional(_: str, raw: str) -> str | None:
    return raw.strip() or None


DEV_HOST = "127.0.0.1"
"""Where ``ROOMS_DEV=1`` listens when ``HOST`` is not set: its secrets are printed."""

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
LOG_FORMATS = ("text", "json")


def parse_log_level(name: str, raw: str) -> str:
    value = raw.strip().upper()
    if value not in LOG_LEVELS:
        raise ConfigError(f"{name}: expected DEBUG, INFO, WARNING or ERROR, got {raw!r}")
    return value


def parse_log_format(name: str, raw: str) -> str:
    value = raw.strip().lower()
    if value not in LOG_FORMATS:
        raise ConfigError(f"{name}: expected text or json, got {raw!r}")
    return value


def check_backend_url(name: str, url: str) -> None:
    """Raise ConfigError (naming ``name``: BACKEND or REDIS_URL) unless ``url`` is a backend URL
    polysignal can use: ``memory://``; ``redis://`` or ``rediss://`` with a host, an optional
    port number and an optional database number (``/0`` or ``?db=0``); ``unix://`` with the
    socket's path; ``redis+cluster://`` or ``rediss+cluster://`` with one or more
    ``host:port`` seeds of a Redis Cluster; or standalone shards, a comma-separated list of
    ``redis://``/``rediss://``/``unix://`` URLs (docs/redis-cluster.md). The URL is shown as the
    logs show it (``redact_url``)."""
    shown = redact_url(url)
    urls = split_backend_urls(url)
    if len(urls) > 1:
        for part in urls:
            check_backend_url(name, part)
            if urlsplit(part).scheme not in ("redis", "rediss", "unix"):
                raise ConfigError(
                    f"{name}: {redact_url(part)}: a list of shards takes redis://, rediss:// or "
                    "unix:// URLs only"
                )
        if len(set(urls)) != len(urls):
            raise ConfigError(f"{name}: {shown} names one shard twice")
        return
    if url.startswith(CLUSTER_SCHEMES):
        parse_cluster_url(name, url)
        return
    try:
        parts = urlsplit(url)
        port = parts.port  # parses it: not a number, or out of range, raises ValueError
    except ValueError as exc:  # the message never carries the URL, which may hold a password
        raise ConfigError(f"{name}: {shown} is not a valid URL ({exc})") from None
    scheme = parts.scheme
    usage = "use memory://, redis://host:port/db, rediss://host:port/db or unix:///path"
    if scheme not in ("memory", "redis", "rediss", "unix"):
        raise ConfigError(f"{name}: unsupported scheme {scheme!r} in {shown} ({usage})")
    if not url[len(scheme) + 1 :].startswith("//"):
        raise ConfigError(f"{name}: {shown} is missing '//' after '{scheme}:' ({usage})")
    if scheme == "memory":
        if parts.netloc or parts.path.strip("/") or parts.query:
            raise ConfigError(f"{name}: {shown}: the memory backend takes nothing after memory://")
        return
    if scheme == "unix":
        if not parts.path or parts.path == "/":
            raise ConfigError(f"{name}: {shown} names no socket path (unix:///path/redis.sock)")
    else:
        if not parts.hostname:
            raise ConfigError(f"{name}: {shown} names no host ({scheme}://host:port/db)")
        if port == 0:
            raise ConfigError(f"{name}: {shown}: port 0 is not a Redis port")
        db = parts.path.strip("/")
        if db and not db.isdigit():
            raise ConfigError(f"{name}: {shown}: database {db!r} is not a number")
    for item in parts.query.split("&") if parts.query else ():
        key, _, value = item.partition("=")
        if key == "db" and not value.isdigit():
            raise ConfigError(f"{name}: {shown}: database {value!r} is not a number")


CLUSTER_SCHEMES = ("redis+cluster://", "rediss+cluster://")
"""URL schemes of a Redis Cluster (or Valkey cluster) backend."""

_URL_LIST = re.compile(r",\s*(?=[A-Za-z][A-Za-z0-9+.-]*://)")


def split_backend_urls(url: str) -> list[str]:
    """A comma-separated list of URLs (standalone shards) as its URLs; one URL as itself.

    Only a comma followed by a scheme (``,redis://``) separates: commas inside one URL (the
    host list of ``redis+cluster://a:1,b:2``) stay."""
    if url.startswith(CLUSTER_SCHEMES):
        return [url]
    return [part.strip() for part in _URL_LIST.split(url)]


@dataclass(frozen=True)
class ClusterUrl:
    """A ``redis+cluster://`` URL taken apart: the seed nodes and how to reach any node."""

    tls: bool
    # ``user:password`` or ``:password`` (percent-encoded, as in the URL), or "": never printed.
    userinfo: str = field(repr=False)
    seeds: tuple[tuple[str, int], ...]
    query: str

    def node_url(self, host: str, port: int) -> str:
        """A plain ``redis://`` (``rediss://``) URL of one node, with the credentials and query
        of the cluster URL."""
        scheme = "rediss" if self.tls else "redis"
        at = f"{self.userinfo}@" if self.userinfo else ""
        shown_host = f"[{host}]" if ":" in host else host
        query = f"?{self.query}" if self.query else ""
        return f"{scheme}://{at}{shown_host}:{port}/0{query}"


def parse_cluster_url(name: str, url: str) -> ClusterUrl:
    """``redis+cluster://[user:password@]host:port[,host:port...][/0][?query]`` (``rediss+`` for
    TLS); raises ConfigError naming ``name`` when it is not one."""
    shown = redact_url(url)
    scheme, _, rest = url.partition("://")
    end = min((i for i in (rest.find("/"), rest.find("?")) if i >= 0), default=len(rest))
    netloc, tail = rest[:end], rest[end:]
    path, _, query = tail.partition("?")
    userinfo, _, hosts = netloc.rpartition("@")
    usage = f"({scheme}://host:port,host:port/)"
    seeds: list[tuple[str, int]] = []
    for item in hosts.split(","):
        text = item.strip()
        if text.startswith("["):
            host, _, port_text = text[1:].partition("]")
            port_text = port_text.removeprefix(":")
        else:
            host, colon, port_text = text.rpartition(":")
            if not colon:
                host, port_text = text, ""
        if not host:
            raise ConfigError(f"{name}: {shown} names a node without a host {usage}")
        if port_text and not port_text.isdigit():
            raise ConfigError(f"{name}: {shown}: port {port_text!r} is not a number")
        port = int(port_text) if port_text else 6379
        if not 0 < port < 65536:
            raise ConfigError(f"{name}: {shown}: {port} is not a Redis port")
        seeds.append((host, port))
    if path.strip("/") not in ("", "0"):
        raise ConfigError(f"{name}: {shown}: a Redis Cluster has only database 0")
    for item in query.split("&") if query else ():
        key, _, value = item.partition("=")
        if key == "db" and value != "0":
            raise ConfigError(f"{name}: {shown}: a Redis Cluster has only database 0")
    return ClusterUrl(scheme == "rediss+cluster", userinfo, tuple(seeds), query)


def parse_ice_servers(name: str, raw: str) -> tuple[dict[str, Any], ...]:
    try:
        value = json.loads(raw)
    except ValueError as exc:
        raise ConfigError(f"{name}: not valid JSON ({exc})") from None
    if isinstance(value, dict) and "iceServers" in value:
        value = value["iceServers"]
    if not isinstance(value, list) or not all(isinstance(s, dict) for s in value):
        raise ConfigError(f"{name}: expected a JSON list of RTCIceServer objects")
    return tuple(value)


def parse_networks(name: str, raw: str) -> tuple[str, ...]:
    """A comma-separated list of CIDRs (a bare address is one host), each checked."""
    networks = []
    for item in raw.split(","):
        text = item.strip()
        if not text:
            continue
        try:
            networks.append(str(ipaddress.ip_network(text, strict=False)))
        except ValueError:
            raise ConfigError(f"{name}: {text!r} is not an IP network (CIDR)") from None
    return tuple(networks)


_DEFAULT_PORTS = {"http": 80, "https": 443}


def parse_allowed_origins(name: str, raw: str) -> tuple[str, ...]:
    """A comma-separated list of origins (``scheme://host[:port]``), ``*`` or ``null``, each
    checked and written as a browser sends it: lower case, without a default port."""
    origins = []
    for item in raw.split(","):
        text = item.strip()
        if text in ("*", "null"):
            origins.append(text)
            continue
        if not text:
            continue
        try:
            parts = urlsplit(text)
            port = parts.port
        except ValueError:
            raise ConfigError(f"{name}: {text!r} has a port out of range") from None
        if (
            not parts.scheme
            or not parts.hostname
            or parts.username is not None
            or parts.path not in ("", "/")
            or parts.query
            or parts.fragment
        ):
            raise ConfigError(
                f"{name}: {text!r} is not an origin (scheme://host[:port], `*` or `null`)"
            )
        scheme = parts.scheme.lower()
        host = parts.hostname
        if ":" in host:  # IPv6
            host = f"[{host}]"
        shown = f"{scheme}://{host}"
        if port is not None and port != _DEFAULT_PORTS.get(scheme):
            shown += f":{port}"
        origins.append(shown)
    return tuple(origins)


def parse_proxy_header(name: str, raw: str) -> str:
    value = raw.strip().lower()
    if value not in ("x-forwarded-for", "forwarded"):
        raise ConfigError(f"{name}: expected X-Forwarded-For or Forwarded, got {raw!r}")
    return value


_PARSERS: dict[Any, Parser] = {
    bool: parse_bool,
    int: parse_int,
    float: parse_float,
    str: parse_text,
    Secret: parse_secret,
}


def setting(
    default: Any = dataclasses.MISSING,
    env: str = "",
    doc: str = "",
    *,
    parse: Parser | None = None,
    factory: Callable[[], Any] | None = None,
    shown: str | None = None,
) -> Any:
    """Declare one setting: its default, environment variable and one-line description.

    ``parse`` defaults to the parser of the field's type; ``shown`` is the default as
    docs/configuration.md prints it, when the value itself is not what a reader should see.
    """
    metadata = {"env": env, "doc": doc, "parse": parse, "shown": shown}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class FieldSpec:
    """One setting as the environment, the command line and the docs see it."""

    name: str
    env: str
    parse: Parser
    doc: str
    group: str
    shown: str | None = None


def fields_of(group: type, name: str) -> tuple[FieldSpec, ...]:
    """The settings declared in the dataclass ``group`` (called ``name`` in the docs)."""
    hints = get_type_hints(group)
    specs = []
    for item in dataclasses.fields(group):
        meta = item.metadata
        if not meta.get("env"):
            continue
        parse = meta["parse"] or _PARSERS[hints[item.name]]
        specs.append(FieldSpec(item.name, meta["env"], parse, meta["doc"], name, meta["shown"]))
    return tuple(specs)


# --- the groups ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServerSettings:
    """Where and how a node runs."""

    host: str = setting("0.0.0.0", "HOST", "Address to listen on.")
    port: int = setting(4444, "PORT", "TCP port for every protocol.")
    node_id: str = setting(
        env="NODE_ID",
        doc="This node's id, stamped as `_origin`.",
        factory=lambda: str(uuid.uuid4()),
        shown="<random UUID>",
    )
    backend_url: str = setting(
        "memory://",
        "BACKEND",
        "`memory://` (one process), `redis://host:port/db`, `redis+cluster://host:port,host:port/` "
        "(Redis Cluster) or `redis://a:6379,redis://b:6379` (standalone shards); a `REDIS_URL` "
        "alone selects Redis.",
    )
    log_level: str = setting(
        "INFO", "LOG_LEVEL", "DEBUG, INFO, WARNING or ERROR.", parse=parse_log_level
    )
    log_format: str = setting(
        "text",
        "LOG_FORMAT",
        "`text` (one readable line per record) or `json` (one JSON object per line; "
        "docs/operations.md, Logs).",
        parse=parse_log_format,
    )
    access_log: bool = setting(
        True,
        "ACCESS_LOG",
        "One INFO line per plain HTTP request aiohttp serves (health probes at DEBUG); 0 = off.",
    )
    workers: int = setting(1, "WORKERS", "Processes sharing the port (needs Redis).")
    shutdown_timeout: float = setting(
        5.0, "SHUTDOWN_TIMEOUT", "Seconds a graceful stop waits for peers to close."
    )
    drain_seconds: float = setting(
        0.0,
        "DRAIN_SECONDS",
        "Seconds a node keeps serving after SIGTERM with `/readyz` at 503, before it closes its"
        " peers (a second SIGTERM ends the drain at once). 0 = stop at once.",
    )
    header_timeout: float = setting(
        10.0,
        "HEADER_TIMEOUT",
        "Seconds a request has to send its whole request line and headers, from its first byte"
        " (the first request of a connection: from the connection; else 408 or, on a connection"
        " kept alive, a close). 0 = no limit.",
    )
    linger: float = setting(
        2.0,
        "LINGER",
        "Seconds a refused client is still read (and what it sends dropped) so it sees the answer.",
    )
    backlog: int = setting(
        2048, "BACKLOG", "Connections the kernel queues before they are accepted."
    )
    backend_wait: float = setting(
        10.0,
        "WORKER_BACKEND_WAIT",
        "Seconds a worker of `--workers` waits for its backend before listening regardless.",
    )
    ice_servers: tuple[dict[str, Any], ...] | None = setting(
        None,
        "ICE_SERVERS",
        "JSON list of RTCIceServer objects handed to clients (Signal-Fire welcome, rooms demo).",
        parse=parse_ice_servers,
    )
    id_lease_ttl: int = setting(
        60,
        "ID_LEASE_TTL",
        "Seconds a claimed id (Signal-Fire and relay peer ids, rooms room names) lives in the "
        "cluster unless renewed (every third of it). At least 1.",
    )
    metrics_port: int = setting(
        0,
        "METRICS_PORT",
        "Also serve `/metrics` and `/stats` on this port (0 = only on `PORT`).",
    )
    metrics_allow: tuple[str, ...] = setting(
        ("127.0.0.0/8", "::1/128"),
        "METRICS_ALLOW",
        "Comma-separated CIDRs allowed to read `/metrics` (others get 403).",
        parse=parse_networks,
        shown="127.0.0.0/8,::1/128",
    )
    admin_token: Secret = setting(
        Secret(""),
        "ADMIN_TOKEN",
        "Bearer token `/stats` asks for; unset: `/stats` answers loopback addresses only.",
    )

    trusted_proxies: tuple[str, ...] = setting(
        (),
        "TRUSTED_PROXIES",
        "Comma-separated CIDRs of the proxies in front of the node (IPv4 and IPv6). From them"
        " the client address is read from PROXY_HEADER; from anyone else that header is ignored."
        " Every per-address limit and log line uses that address.",
        parse=parse_networks,
        shown="(none)",
    )
    proxy_header: str = setting(
        "x-forwarded-for",
        "PROXY_HEADER",
        "The header trusted proxies append the client address to: `X-Forwarded-For` (its"
        " rightmost untrusted hop) or `Forwarded` (RFC 7239 `for=`); the other is ignored.",
        parse=parse_proxy_header,
        shown="X-Forwarded-For",
    )
    allowed_origins: tuple[str, ...] = setting(
        ("*",),
        "ALLOWED_ORIGINS",
        "Comma-separated origins (`https://app.example.com`) whose pages may open a WebSocket"
        " (every protocol, socket.io included) and socket.io's CORS; others get 403. A request"
        " without `Origin` (not a browser) is allowed. `*` = any.",
        parse=parse_allowed_origins,
        shown="*",
    )
    tls_cert: str | None = setting(
        None,
        "TLS_CERT",
        "PEM certificate chain file: with TLS_KEY, the port serves https:// and wss:// only;"
        " both are read again on SIGHUP.",
        parse=parse_optional,
    )
    tls_key: str | None = setting(
        None, "TLS_KEY", "PEM private key file of TLS_CERT.", parse=parse_optional
    )

    def __post_init__(self) -> None:
        try:
            urlsplit(self.backend_url)
        except ValueError as exc:  # shown without the URL, which may carry a password
            raise ConfigError(f"BACKEND: not a URL ({exc})") from None

    def __repr__(self) -> str:
        # The backend URL may carry Redis's password: shown as the logs show it.
        shown = [
            f"{f.name}={getattr(self, f.name)!r}"
            if f.name != "backend_url"
            else f"backend_url={redact_url(self.backend_url)!r}"
            for f in dataclasses.fields(self)
        ]
        return f"ServerSettings({', '.join(shown)})"


@dataclass(frozen=True)
class LimitSettings:
    """What every WebSocket connection is held to, whatever its protocol."""

    max_header_bytes: int = setting(
        16384,
        "MAX_HEADER_BYTES",
        "Largest request line and headers, together, in bytes (else 431).",
    )
    max_headers: int = setting(100, "MAX_HEADERS", "Most header lines in a request (else 431).")
    max_frame_bytes: int = setting(
        65536,
        "MAX_FRAME_BYTES",
        "Largest WebSocket message accepted; larger closes with 1009.",
    )
    rate_limit: float = setting(
        200.0,
        "RATE_LIMIT",
        "Messages per second one connection may send (token bucket refill); 0 = no limit.",
    )
    rate_burst: int = setting(400, "RATE_BURST", "Token bucket size.")
    max_connections_per_ip: int = setting(
        1000,
        "MAX_CONNECTIONS_PER_IP",
        "Open TCP connections per client address, whatever they carry (a request still being"
        " read, a WebSocket, HTTP or socket.io); more are answered 429; 0 = unlimited.",
    )
    send_buffer_bytes: int = setting(
        1 << 20,
        "SEND_BUFFER_BYTES",
        "Unsent bytes a connection may queue before it is closed with 1013.",
    )
    ping_interval: float = setting(
        30.0,
        "PING_INTERVAL",
        "Seconds between WebSocket pings; a peer silent (no pong) for one interval is closed. "
        "0 = off.",
    )


@dataclass(frozen=True)
class TopicsSettings:
    """The topics protocol (y-webrtc, Flow-Like)."""

    echo: bool = setting(False, "ECHO", "Also deliver a publish to its sender.")
    max_topics_per_connection: int = setting(
        256, "MAX_TOPICS_PER_CONNECTION", "Topics one connection may be subscribed to."
    )
    max_topics_per_address: int = setting(
        16384,
        "MAX_TOPICS_PER_ADDRESS",
        "Subscriptions the connections of one client address may hold together; 0 = unlimited.",
    )
    max_topic_length: int = setting(512, "MAX_TOPIC_LENGTH", "Longest topic, in characters.")


@dataclass(frozen=True)
class RedisSettings:
    """The Redis backend."""

    signal_channel: str = setting(
        "signal:publish", "SIGNAL_CHANNEL", "Prefix of the Redis channels."
    )
    presence_ttl: int = setting(
        90, "PRESENCE_TTL", "Seconds a node's presence counts live in Redis unless refreshed."
    )
    presence_refresh: float = setting(
        10.0, "PRESENCE_REFRESH", "Seconds between presence TTL refreshes."
    )
    presence_cache_ttl: float = setting(
        2.0,
        "PRESENCE_CACHE_TTL",
        "Longest a cached cluster-wide `clients` count is used without re-reading Redis.",
    )
    redis_backoff_max: float = setting(
        0.5,
        "REDIS_BACKOFF_MAX",
        "Longest wait, in seconds, between two attempts to reach Redis (the backoff starts at "
        "0.2 and doubles): a node notices within it that Redis is back. After Redis came back "
        "empty, new claims wait this plus 0.5 s, the settle grace (docs/redis.md, Faults).",
    )
    redis_connect_timeout: float = setting(
        5.0, "REDIS_CONNECT_TIMEOUT", "Seconds to open a connection to Redis."
    )
    redis_command_timeout: float = setting(
        5.0,
        "REDIS_COMMAND_TIMEOUT",
        "Seconds one batch of commands may take before the connection is considered lost.",
    )
    redis_read_timeout: float = setting(
        2.0,
        "REDIS_READ_TIMEOUT",
        "Seconds a caller asking for a fresh `clients` count waits for Redis before the cached or "
        "local count is used (a publish never waits: it uses the cached count).",
    )
    redis_keepalive: float = setting(
        5.0,
        "REDIS_KEEPALIVE",
        "Seconds between PINGs on the subscriber connection; silence for 3x this drops it.",
    )
    redis_outbox_bytes: int = setting(
        8 << 20,
        "REDIS_OUTBOX_BYTES",
        "Bytes of publishes queued for Redis before publishers wait for the writer.",
    )
    redis_cluster_partitions: int = setting(
        128,
        "REDIS_CLUSTER_PARTITIONS",
        "Redis Cluster: sharded pub/sub channels the topics are spread over (1-16384; every node "
        "of a cluster must use the same number; docs/redis-cluster.md).",
    )
    redis_cluster_probe: float = setting(
        2.0,
        "REDIS_CLUSTER_PROBE",
        "Redis Cluster: seconds between liveness probes of each shard subscription (an SPUBLISH "
        "that must come back); silence for 3x this drops the connection.",
    )


@dataclass(frozen=True)
class RelaySettings:
    """The relay protocol (cevitxe-signal-server, @localfirst/relay)."""

    relay_buffer_bytes: int = setting(
        1 << 20,
        "RELAY_BUFFER_BYTES",
        "Bytes a held `/connection` socket may hold before its peer arrives, each frame counted "
        "as its payload plus 128; at most SEND_BUFFER_BYTES apply (the peer is sent them at once).",
    )
    relay_address_buffer_bytes: int = setting(
        16 << 20,
        "RELAY_ADDRESS_BUFFER_BYTES",
        "Bytes all held `/connection` sockets of one client address may hold together, counted as "
        "for RELAY_BUFFER_BYTES; 0 = no limit.",
    )
    relay_wait_timeout: float = setting(
        60.0,
        "RELAY_WAIT_TIMEOUT",
        "Seconds a `/connection` socket is held waiting for its peer.",
    )
    relay_max_frame_bytes: int = setting(
        256 * 1024,
        "RELAY_MAX_FRAME_BYTES",
        "Largest frame on a `/connection` pipe (document sync); larger closes with 1009.",
    )
    relay_max_documents: int = setting(
        256, "RELAY_MAX_DOCUMENTS", "Document ids one `/introduction` peer may hold."
    )
    relay_max_id_length: int = setting(
        512, "RELAY_MAX_ID_LENGTH", "Longest peer id or document id, in characters."
    )
    relay_match_timeout: float = setting(
        5.0,
        "RELAY_MATCH_TIMEOUT",
        "Seconds a `/connection` socket waits for another node to confirm a pipe.",
    )
    relay_backpressure_timeout: float = setting(
        30.0,
        "RELAY_BACKPRESSURE_TIMEOUT",
        "Seconds a pipe's writer waits for a reader that is behind before the send buffer "
        "limit (1013) decides.",
    )


@dataclass(frozen=True)
class SignalFireSettings:
    """The Signal-Fire protocol."""

    signalfire_path: str = setting(
        "/signal-fire",
        "SIGNALFIRE_PATH",
        "Path where any WebSocket speaks Signal-Fire, with or without subprotocol.",
    )
    session_timeout: float = setting(
        30.0,
        "SESSION_TIMEOUT",
        "Seconds before an unanswered `session-start` times out; 0 = never.",
    )


def parse_origins(_: str, raw: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in raw.split(",") if part.strip())


@dataclass(frozen=True)
class PeerJsSettings:
    """The PeerJS protocol (the `peerjs` client, server `peer` 1.0.2)."""

    peerjs_path: str = setting(
        "/",
        "PEERJS_PATH",
        "Mount path of PeerJS: `GET {path}`, `{path}{key}/id`, `{path}{key}/peers`, and the "
        "WebSocket on `{path}peerjs` (the client's `path` option).",
    )
    peerjs_key: str = setting("peerjs", "PEERJS_KEY", "The key clients must give (`key`).")
    peerjs_concurrent_limit: int = setting(
        5000,
        "PEERJS_CONCURRENT_LIMIT",
        "Clients one node holds at once; more are refused with the original's ERROR.",
    )
    peerjs_allow_discovery: bool = setting(
        False, "PEERJS_ALLOW_DISCOVERY", "Serve `GET {path}{key}/peers` (else 401)."
    )
    peerjs_alive_timeout: float = setting(
        60.0,
        "PEERJS_ALIVE_TIMEOUT",
        "Seconds a client may send nothing (its heartbeat comes every 5) before it is closed; "
        "0 = never.",
    )
    peerjs_expire_timeout: float = setting(
        5.0,
        "PEERJS_EXPIRE_TIMEOUT",
        "Seconds a message for an id that is not connected waits; then its sender gets EXPIRE.",
    )
    peerjs_stale_after: float = setting(
        10.0,
        "PEERJS_STALE_AFTER",
        "Seconds without a frame after which a client no longer blocks its id: a connection "
        "with another token takes the id over (two 5 s heartbeats missed).",
    )
    peerjs_queue_messages: int = setting(
        64,
        "PEERJS_QUEUE_MESSAGES",
        "Messages queued for one id that is not connected; one more gets its sender EXPIRE.",
    )
    peerjs_queue_bytes: int = setting(
        256 * 1024,
        "PEERJS_QUEUE_BYTES",
        "Bytes of messages queued for one id that is not connected; past it, EXPIRE at once.",
    )
    peerjs_queue_node_bytes: int = setting(
        64 << 20,
        "PEERJS_QUEUE_NODE_BYTES",
        "Bytes of messages one node queues for all ids together; past it, EXPIRE at once.",
    )
    peerjs_cors_origins: tuple[str, ...] = setting(
        (),
        "PEERJS_CORS_ORIGINS",
        "Comma-separated origins the HTTP routes allow (CORS); empty = any origin.",
        parse=parse_origins,
        shown="(any)",
    )


@dataclass(frozen=True)
class RoomsSettings:
    """The rooms protocol (wrtc-signal over socket.io)."""

    app_secret: Secret = setting(
        env="APP_SECRET",
        doc="HMAC key of the rooms tokens.",
        factory=lambda: Secret(""),
        shown="(unset)",
    )
    app_pass: Secret = setting(
        env="APP_PASS",
        doc="Password `POST /app` requires.",
        factory=lambda: Secret(""),
        shown="(unset)",
    )
    token_lifetime: int = setting(
        86400, "TOKEN_LIFETIME", "Seconds a rooms session token is valid."
    )
    max_payload_bytes: int = setting(
        16384, "MAX_PAYLOAD_BYTES", "Largest `payload` of a rooms event, as JSON bytes."
    )
    rooms_max_per_socket: int = setting(
        256,
        "ROOMS_MAX_PER_SOCKET",
        "Rooms one socket may be in or be creating; a create or join past it is refused.",
    )
    rooms_max_name_length: int = setting(
        512, "ROOMS_MAX_NAME_LENGTH", "Longest room name, in characters."
    )
    rooms_max_pending: int = setting(
        1024, "ROOMS_MAX_PENDING", "Join requests one room may hold for its owner's answer."
    )
    rooms_max_pending_per_socket: int = setting(
        16,
        "ROOMS_MAX_PENDING_PER_SOCKET",
        "Join requests one socket may have waiting for their owners' answers at once.",
    )
    rooms_dev: bool = setting(
        False,
        "ROOMS_DEV",
        "Run the rooms protocol with printed development secrets when unset; listens on "
        "127.0.0.1 unless `HOST` is set.",
    )
    app_max_failures: int = setting(
        5,
        "APP_MAX_FAILURES",
        "Wrong passwords one client address may send `POST /app` per APP_FAILURE_WINDOW; "
        "more are answered 429 with `Retry-After`. 0 = no limit.",
    )
    app_failure_window: float = setting(
        60.0,
        "APP_FAILURE_WINDOW",
        "Seconds over which APP_MAX_FAILURES counts a client address's wrong passwords.",
    )


def parse_secrets(name: str, raw: str) -> tuple[Secret, ...]:
    """A comma-separated list of secrets, the first one first (it signs; all are accepted)."""
    secrets = tuple(Secret(part.strip()) for part in raw.split(",") if part.strip())
    if not secrets:
        raise ConfigError(f"{name}: no secret given")
    return secrets


_TURN_SCHEMES = ("turn:", "turns:", "stun:", "stuns:")


def parse_turn_uris(name: str, raw: str) -> tuple[str, ...]:
    """A comma-separated list of TURN/STUN URIs (RFC 7065), each checked for its scheme."""
    uris = []
    for item in raw.split(","):
        text = item.strip()
        if not text:
            continue
        if not text.lower().startswith(_TURN_SCHEMES) or len(text.partition(":")[2]) == 0:
            raise ConfigError(
                f"{name}: {text!r} is not a TURN or STUN URI "
                "(turn:host[:port][?transport=udp|tcp], turns:..., stun:...)"
            )
        uris.append(text)
    return tuple(uris)


AUTH_PROTOCOLS = ("topics", "relay", "signalfire", "peerjs", "rooms")
"""What ``AUTH`` may name (``signal-fire`` is read as ``signalfire``); ``all`` names every one."""


def parse_auth(name: str, raw: str) -> tuple[str, ...]:
    """``AUTH``: the protocols whose connections must authenticate (``all``, or a list)."""
    items = [item.strip().lower().replace("signal-fire", "signalfire") for item in raw.split(",")]
    items = [item for item in items if item]
    if items in (["all"], ["on"], ["1"]):
        return AUTH_PROTOCOLS
    if items in (["off"], ["0"], []):
        return ()
    unknown = [item for item in items if item not in AUTH_PROTOCOLS]
    if unknown:
        raise ConfigError(
            f"{name}: unknown protocol {unknown[0]!r}; expected all, off, or a comma-separated "
            f"list of {', '.join(AUTH_PROTOCOLS)}"
        )
    return tuple(p for p in AUTH_PROTOCOLS if p in items)


def parse_words(_: str, raw: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in raw.split(",") if part.strip())


@dataclass(frozen=True)
class TurnSettings:
    """TURN credentials in coturn's `use-auth-secret` scheme (docs/operations/turn.md)."""

    turn_secret: tuple[Secret, ...] = setting(
        (),
        "TURN_SECRET",
        "Comma-separated shared secrets of the TURN server (its `static-auth-secret`); the "
        "first signs, every one is accepted by a TURN server configured with them (rotation).",
        parse=parse_secrets,
        shown="(unset)",
    )
    turn_uris: tuple[str, ...] = setting(
        (),
        "TURN_URIS",
        "Comma-separated TURN/STUN URIs handed out with the credentials "
        "(`turn:turn.example.com:3478?transport=udp`).",
        parse=parse_turn_uris,
        shown="(unset)",
    )
    turn_ttl: int = setting(
        86400, "TURN_TTL", "Seconds a TURN credential is valid from the moment it is handed out."
    )


@dataclass(frozen=True)
class AuthSettings:
    """Authentication of clients: JWTs or a connect webhook (docs/security.md)."""

    auth: tuple[str, ...] = setting(
        (),
        "AUTH",
        "Protocols whose connections must authenticate: `all`, `off`, or a comma-separated "
        "list of topics, relay, signalfire, peerjs, rooms. With any, `GET /turn-credentials` "
        "must authenticate too.",
        parse=parse_auth,
        shown="off",
    )
    auth_jwt_key: Secret = setting(
        env="AUTH_JWT_KEY",
        doc="Key that verifies client JWTs: an HMAC secret, or a PEM public key (RSA, EC, "
        "Ed25519).",
        factory=lambda: Secret(""),
        shown="(unset)",
    )
    auth_jwt_key_file: str | None = setting(
        None,
        "AUTH_JWT_KEY_FILE",
        "File holding AUTH_JWT_KEY (a PEM public key).",
        parse=parse_optional,
    )
    auth_jwt_algorithms: tuple[str, ...] = setting(
        (),
        "AUTH_JWT_ALGORITHMS",
        "Comma-separated JWT algorithms accepted; by default the one the key is for (HS256 for a "
        "secret, RS256, ES256 or EdDSA for a public key).",
        parse=parse_words,
        shown="(from the key)",
    )
    auth_jwt_audience: str | None = setting(
        None, "AUTH_JWT_AUDIENCE", "Required `aud` of client JWTs.", parse=parse_optional
    )
    auth_jwt_issuer: str | None = setting(
        None, "AUTH_JWT_ISSUER", "Required `iss` of client JWTs.", parse=parse_optional
    )
    auth_jwt_leeway: float = setting(
        30.0, "AUTH_JWT_LEEWAY", "Seconds of clock skew allowed on `exp` and `nbf`."
    )
    auth_webhook_url: str | None = setting(
        None,
        "AUTH_WEBHOOK_URL",
        "URL the server POSTs each connection's credentials to; its answer allows or denies.",
        parse=parse_optional,
    )
    auth_webhook_timeout: float = setting(
        2.0, "AUTH_WEBHOOK_TIMEOUT", "Seconds the webhook may take; later counts as a denial."
    )
    auth_webhook_cache_seconds: float = setting(
        60.0,
        "AUTH_WEBHOOK_CACHE_SECONDS",
        "Seconds a webhook's answer is reused for the same credentials; 0 = not cached.",
    )
    auth_webhook_cache_size: int = setting(
        10000, "AUTH_WEBHOOK_CACHE_SIZE", "Webhook answers held at most (oldest dropped first)."
    )
    auth_cookie: str = setting(
        "polysignal_token",
        "AUTH_COOKIE",
        "Cookie that may carry the token (for clients that cannot put it in the URL).",
    )


GROUPS: tuple[tuple[str, type], ...] = (
    ("server", ServerSettings),
    ("limits", LimitSettings),
    ("topics", TopicsSettings),
    ("redis", RedisSettings),
    ("relay", RelaySettings),
    ("signalfire", SignalFireSettings),
    ("peerjs", PeerJsSettings),
    ("rooms", RoomsSettings),
    ("turn", TurnSettings),
    ("auth", AuthSettings),
)

FIELDS: tuple[FieldSpec, ...] = tuple(
    spec for name, group in GROUPS for spec in fields_of(group, name)
)
"""Every setting, in the order of docs/configuration.md."""

_GROUP_OF: dict[str, str] = {spec.name: spec.group for spec in FIELDS}


@dataclass(frozen=True)
class Settings:
    """Every knob of a polysignal node, by concern. Build with ``Settings.from_env()``."""

    server: ServerSettings = field(default_factory=ServerSettings)
    limits: LimitSettings = field(default_factory=LimitSettings)
    topics: TopicsSettings = field(default_factory=TopicsSettings)
    redis: RedisSettings = field(default_factory=RedisSettings)
    relay: RelaySettings = field(default_factory=RelaySettings)
    signalfire: SignalFireSettings = field(default_factory=SignalFireSettings)
    peerjs: PeerJsSettings = field(default_factory=PeerJsSettings)
    rooms: RoomsSettings = field(default_factory=RoomsSettings)
    turn: TurnSettings = field(default_factory=TurnSettings)
    auth: AuthSettings = field(default_factory=AuthSettings)

    @classmethod
    def of(cls, **values: Any) -> Settings:
        """Settings with ``values`` (field names, any group) and the defaults elsewhere."""
        return cls().replace(**values)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Read every setting from ``environ``; ``overrides`` (CLI flags, field names) win.

        Raises ConfigError naming the variable when a value cannot be parsed or used.
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
            if overrides.get("backend_url") is None:
                check_backend_url("REDIS_URL", env["REDIS_URL"])
        values.update({k: v for k, v in overrides.items() if v is not None})
        # Development secrets stay on this machine unless HOST says otherwise.
        if values.get("rooms_dev") and "host" not in values:
            values["host"] = DEV_HOST
        settings = cls.of(**values)
        settings.validate()
        return settings

    def replace(self, **values: Any) -> Settings:
        """A copy with ``values`` (field names of any group) changed."""
        by_group: dict[str, dict[str, Any]] = {}
        for name, value in values.items():
            group = _GROUP_OF.get(name)
            if group is None:
                raise TypeError(f"unknown setting {name!r}")
            by_group.setdefault(group, {})[name] = value
        groups = {
            group: dataclasses.replace(getattr(self, group), **changes)
            for group, changes in by_group.items()
        }
        return dataclasses.replace(self, **groups)

    def items(self) -> Iterator[tuple[FieldSpec, Any]]:
        """Every setting with its value."""
        for spec in FIELDS:
            yield spec, getattr(getattr(self, spec.group), spec.name)

    @property
    def backend_scheme(self) -> str:
        """``memory``, ``redis``, ``rediss``, ``unix``, ``redis+cluster``, ``rediss+cluster``, or
        ``redis+shards`` for a list of standalone shards."""
        url = self.server.backend_url
        if len(split_backend_urls(url)) > 1:
            return "redis+shards"
        return urlsplit(url).scheme

    def validate(self) -> None:
        server, limits, relay = self.server, self.limits, self.relay
        scheme = self.backend_scheme
        check_backend_url("BACKEND", server.backend_url)
        if not 1 <= self.redis.redis_cluster_partitions <= 16384:
            raise ConfigError("REDIS_CLUSTER_PARTITIONS: must be between 1 and 16384")
        if self.redis.redis_cluster_probe <= 0:
            raise ConfigError("REDIS_CLUSTER_PROBE: must be more than 0 seconds")
        if server.log_level not in LOG_LEVELS:
            raise ConfigError(
                f"LOG_LEVEL: expected DEBUG, INFO, WARNING or ERROR, got {server.log_level!r}"
            )
        if server.log_format not in LOG_FORMATS:
            raise ConfigError(f"LOG_FORMAT: expected text or json, got {server.log_format!r}")
        rooms = self.rooms
        if not rooms.rooms_dev and bool(rooms.app_secret) != bool(rooms.app_pass):
            given, missing = ("APP_SECRET", "APP_PASS")
            if not rooms.app_secret:
                given, missing = missing, given
            raise ConfigError(
                f"APP_SECRET and APP_PASS: {given} is set but {missing} is not; the rooms "
                "protocol needs both (or neither, to stay off; ROOMS_DEV=1 for development)"
            )
        if rooms.app_max_failures and rooms.app_failure_window <= 0:
            raise ConfigError("APP_FAILURE_WINDOW: must be more than 0 (or APP_MAX_FAILURES=0)")
        if not 0 < server.port < 65536 and server.port != 0:
            raise ConfigError(f"PORT: {server.port} is not a TCP port")
        if server.workers < 1:
            raise ConfigError("WORKERS: must be at least 1")
        if server.workers > 1 and scheme == "memory":
            raise ConfigError(
                "--workers > 1 needs a shared backend: set BACKEND=redis://... (or REDIS_URL); "
                "workers on the memory backend could not see each other's peers"
            )
        if server.id_lease_ttl < 1:
            raise ConfigError("ID_LEASE_TTL: must be at least 1 second (renewed every third)")
        if limits.max_header_bytes < 1024:
            raise ConfigError("MAX_HEADER_BYTES: must be at least 1024")
        if limits.max_headers < 1:
            raise ConfigError("MAX_HEADERS: must be at least 1")
        if limits.max_frame_bytes < 1024:
            raise ConfigError("MAX_FRAME_BYTES: must be at least 1024")
        if relay.relay_max_frame_bytes < 1024:
            raise ConfigError("RELAY_MAX_FRAME_BYTES: must be at least 1024")
        # A held frame counts its payload plus 128 bytes (``FRAME_COST`` in core/relay.py).
        if relay.relay_max_frame_bytes + 128 > relay.relay_buffer_bytes or (
            relay.relay_max_frame_bytes > limits.send_buffer_bytes
        ):
            raise ConfigError(
                "RELAY_MAX_FRAME_BYTES: must leave 128 bytes of RELAY_BUFFER_BYTES (a held frame "
                "counts its payload plus 128) and not exceed SEND_BUFFER_BYTES, or one frame "
                "would overflow the buffers that hold it"
            )
        if not self.signalfire.signalfire_path.startswith("/"):
            raise ConfigError("SIGNALFIRE_PATH: must start with '/'")
        peerjs = self.peerjs
        if not peerjs.peerjs_path.startswith("/"):
            raise ConfigError("PEERJS_PATH: must start with '/'")
        if not peerjs.peerjs_key:
            raise ConfigError("PEERJS_KEY: must not be empty (clients always send a key)")
        if peerjs.peerjs_expire_timeout <= 0:
            raise ConfigError("PEERJS_EXPIRE_TIMEOUT: must be more than 0")
        turn = self.turn
        if bool(turn.turn_secret) != bool(turn.turn_uris):
            given, missing = ("TURN_SECRET", "TURN_URIS")
            if not turn.turn_secret:
                given, missing = missing, given
            raise ConfigError(f"{missing}: must be set with {given} (set both, or neither)")
        if turn.turn_ttl < 60:
            raise ConfigError("TURN_TTL: must be at least 60 seconds")
        self.auth_check()
        # TLS: both files or neither (docs/operations/edge.md).
        if bool(server.tls_cert) != bool(server.tls_key):
            given, missing = ("TLS_CERT", "TLS_KEY") if server.tls_cert else ("TLS_KEY", "TLS_CERT")
            raise ConfigError(f"{missing}: must be set with {given} (set both, or neither)")
        if server.tls_cert and server.tls_key:  # unreadable files: a startup error, not later
            from polysignal.server.tls import load_context

            load_context(server.tls_cert, server.tls_key)

    def auth_check(self) -> None:
        """``AUTH`` needs exactly one way to check a token (docs/security.md)."""
        auth = self.auth
        jwt = bool(auth.auth_jwt_key) or auth.auth_jwt_key_file is not None
        if auth.auth_jwt_key and auth.auth_jwt_key_file is not None:
            raise ConfigError("AUTH_JWT_KEY_FILE: set AUTH_JWT_KEY or AUTH_JWT_KEY_FILE, not both")
        if jwt and auth.auth_webhook_url:
            raise ConfigError(
                "AUTH_WEBHOOK_URL: set a JWT key (AUTH_JWT_KEY, AUTH_JWT_KEY_FILE) or a webhook, "
                "not both"
            )
        if auth.auth and not jwt and not auth.auth_webhook_url:
            raise ConfigError(
                "AUTH: needs AUTH_JWT_KEY, AUTH_JWT_KEY_FILE or AUTH_WEBHOOK_URL to check tokens"
            )
        if auth.auth_webhook_url is not None:
            scheme = urlsplit(auth.auth_webhook_url).scheme
            if scheme not in ("http", "https") or not urlsplit(auth.auth_webhook_url).hostname:
                raise ConfigError(
                    f"AUTH_WEBHOOK_URL: expected an http:// or https:// URL, got "
                    f"{redact_url(auth.auth_webhook_url)!r}"
                )
        if auth.auth_webhook_timeout <= 0:
            raise ConfigError("AUTH_WEBHOOK_TIMEOUT: must be more than 0")
        if jwt:  # an unreadable key or one no algorithm fits: a startup error, not later
            jwt_verifier(auth)


def jwt_verifier(auth: AuthSettings) -> JwtVerifier:
    """The verifier of client JWTs ``auth`` describes; ConfigError naming the setting."""
    from polysignal.core.auth import JwtVerifier

    name = "AUTH_JWT_KEY"
    key = auth.auth_jwt_key.reveal()
    if auth.auth_jwt_key_file is not None:
        name = "AUTH_JWT_KEY_FILE"
        try:
            with open(auth.auth_jwt_key_file, encoding="utf-8") as file:
                key = file.read()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{name}: cannot read {auth.auth_jwt_key_file!r} ({exc})") from None
    try:
        return JwtVerifier(
            key,
            auth.auth_jwt_algorithms,
            audience=auth.auth_jwt_audience,
            issuer=auth.auth_jwt_issuer,
            leeway=auth.auth_jwt_leeway,
        )
    except ValueError as exc:
        raise ConfigError(f"{name}: {exc}") from None


# --- docs/configuration.md ----------------------------------------------------------------------

CONFIG_DOC_HEADER = """# Configuration

Every setting of polysignal, as an environment variable; each is also a flag of `polysignal serve`
(`MAX_FRAME_BYTES` -> `--max-frame-bytes`; booleans are bare flags: `--echo`). Flags win over the
environment. Invalid values stop the server at start with a message naming the variable.
This page is generated by `polysignal config-table > docs/configuration.md`; a test keeps it in
step with the code.
"""


def shown_default(spec: FieldSpec, value: Any) -> str:
    if spec.shown is not None:
        return spec.shown
    if isinstance(value, Secret) or value is None:
        return "(unset)"
    if isinstance(value, bool):
        return "1" if value else "0"
    return str(value)


def config_table() -> str:
    """docs/configuration.md: one table per group, every setting with its default."""
    defaults = Settings()
    out = [CONFIG_DOC_HEADER]
    for name, group in GROUPS:
        out.append(f"\n## {name}\n\n{(group.__doc__ or '').strip()}\n\n")
        out.append("| variable | default | meaning |\n|---|---|---|\n")
        for spec in fields_of(group, name):
            value = getattr(getattr(defaults, spec.group), spec.name)
            out.append(f"| `{spec.env}` | `{shown_default(spec, value)}` | {spec.doc} |\n")
        if name == "server":
            out.append(
                "| `REDIS_URL` | (unset) | Redis URL; selects the Redis backend when "
                "`BACKEND` is unset. |\n"
            )
    return "".join(out)
