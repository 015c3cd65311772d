"""Logging policy (docs/architecture.md, "Logging"; for operators docs/operations.md, "Logs").

* INFO: lifecycle (listening, backend connected, shutdown), one line each; connections opening
  and closing; one line per plain HTTP request (the access log, ``ACCESS_LOG``).
* DEBUG: per message, with payloads elided to their size.
* WARNING: degraded (backend down, peer cut off for not reading, limits hit repeatedly).
* ERROR: bugs only (an exception escaping a handler), with a traceback.

Loggers are named per layer and part: ``polysignal.server``, ``polysignal.topics``,
``polysignal.redis``, ``polysignal.presence``, ``polysignal.publish``, ``polysignal.relay``,
``polysignal.signalfire``, ``polysignal.rooms``, ``polysignal.serverless``,
``polysignal.workers``, ``polysignal.backend``, ``polysignal.access``. The part's name is
printed as the tag, e.g. ``[redis]``. Secrets and URL credentials never reach a log line.

Two formats (``LOG_FORMAT``), both with UTC times to the millisecond:

* ``text``: ``2026-12-01T19:30:20.123Z INFO    [topics] message conn=12 proto=topics
  remote=10.0.0.7 peer=abc``, a traceback on the lines after;
* ``json``: one object per line (python-json-logger's orjson formatter): ``time``, ``level``,
  ``logger`` (the tag), ``message``, the connection's fields and any other ``extra``, and a
  traceback as one string in ``traceback``.

A line about one connection carries its context as ``extra`` fields (``CONTEXT_FIELDS``:
``conn_id``, ``protocol``, ``remote``, ``peer_id``); text appends them, JSON has them as keys.
"""

from __future__ import annotations

import logging
import re
import sys
import time
from typing import IO, Any

import orjson
from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.web_request import BaseRequest
from aiohttp.web_response import StreamResponse
from pythonjsonlogger.core import merge_record_extra
from pythonjsonlogger.orjson import OrjsonFormatter

# Re-exported: the server's modules log through this one.
from polysignal.throttle import Throttle as Throttle
from polysignal.throttle import more as more

CONTEXT_FIELDS: tuple[tuple[str, str], ...] = (
    ("conn_id", "conn"),
    ("protocol", "proto"),
    ("remote", "remote"),
    ("peer_id", "peer"),
)
"""The connection's fields a record may carry (``extra=``), with their label in text lines."""

_PLAIN = re.compile(r"[\x21-\x7e]+")
"""A value text lines show as it is; any other (spaces, quotes, control characters, a client's
id) is shown as a JSON string, so it cannot forge a field or a line."""

access_log = logging.getLogger("polysignal.access")
# Quiet until ``configure`` sets the process's level: a program (or a test) that embeds the
# server without configuring logging gets no line per request.
access_log.setLevel(logging.WARNING)


def tag_of(name: str) -> str:
    """The tag of logger ``name``: its part for polysignal's (``polysignal.redis`` -> ``redis``),
    the whole name for a library's (``aiohttp.server``)."""
    if name.startswith("polysignal."):
        return name.rsplit(".", 1)[-1]
    return name


def utc_time(record: logging.LogRecord) -> str:
    """``2026-12-01T19:30:20.123Z``: the record's time in UTC, to the millisecond."""
    seconds = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
    return f"{seconds}.{int(record.msecs):03d}Z"


def _shown(value: object) -> str:
    text = str(value)
    if _PLAIN.fullmatch(text) and '"' not in text:
        return text
    return orjson.dumps(text).decode()


def context_of(record: logging.LogRecord) -> str:
    """The text suffix of a connection's fields: `` conn=12 proto=topics remote=10.0.0.7
    peer=abc`` (each only when the record has it)."""
    fields = record.__dict__
    return "".join(
        f" {label}={_shown(fields[name])}"
        for name, label in CONTEXT_FIELDS
        if fields.get(name) is not None and fields[name] != ""
    )


class TextFormatter(logging.Formatter):
    """``time LEVEL [tag] message`` and the connection's fields; a traceback on the lines
    after."""

    def format(self, record: logging.LogRecord) -> str:
        record.message = record.getMessage()
        line = (
            f"{utc_time(record)} {record.levelname:<7} [{tag_of(record.name)}] "
            f"{record.message}{context_of(record)}"
        )
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            line += "\n" + record.exc_text
        if record.stack_info:
            line += "\n" + self.formatStack(record.stack_info)
        return line


class JsonFormatter(OrjsonFormatter):
    """One JSON object per record: ``time``, ``level``, ``logger`` (the tag), ``message``, then
    every ``extra`` field (the connection's ``conn_id``, ``protocol``, ``remote``, ``peer_id``;
    the access log's ``method``, ``path``, ``status``, ...), then ``traceback``, one string,
    when the record has one."""

    def __init__(self) -> None:
        super().__init__(rename_fields={"exc_info": "traceback"})

    def add_fields(
        self, log_data: dict[str, Any], record: logging.LogRecord, message_dict: dict[str, Any]
    ) -> None:
        log_data["time"] = utc_time(record)
        log_data["level"] = record.levelname
        log_data["logger"] = tag_of(record.name)
        log_data["message"] = record.message
        merge_record_extra(record, log_data, reserved=self._skip_fields)
        for key, value in message_dict.items():
            log_data[self._get_rename(key)] = value


def formatter(fmt: str) -> logging.Formatter:
    """The formatter of ``LOG_FORMAT`` ``fmt`` (``text`` or ``json``)."""
    return JsonFormatter() if fmt == "json" else TextFormatter()


def configure(level: str = "INFO", fmt: str = "text", stream: IO[str] | None = None) -> None:
    """Send every record to stderr (or ``stream``) in format ``fmt``: polysignal's at ``level``
    (``LOG_LEVEL``), the access log's too, and the libraries' (aiohttp, asyncio, redis) from
    WARNING, so that every line of the process has one format."""
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(formatter(fmt))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    ours = logging.getLogger("polysignal")
    ours.handlers.clear()
    ours.setLevel(level)
    ours.propagate = True
    access_log.setLevel(level)


PROBES = frozenset({"/healthz", "/readyz", "/metrics"})
"""Paths load balancers and scrapers ask every few seconds: their access lines are DEBUG."""
MAX_PATH = 256
"""Characters of a path an access line shows; a longer one is cut, marked with ``...``."""


CLIENT_KEY = web.RequestKey("client", str)
"""On a request a trusted proxy forwarded: its client's address (``server/frontdoor.py`` puts it
there; the handlers get a clone whose ``remote`` is it, but the access log sees this request)."""


class AccessLogger(AbstractAccessLogger):
    """aiohttp's access log (``ACCESS_LOG``): one line per plain HTTP request aiohttp served,
    ``GET /app 401 63 bytes 1.2 ms remote=10.0.0.7``, at INFO (DEBUG for ``PROBES``).

    The path is the raw one without its query: a query may carry a secret (an engine.io
    ``sid``, a PeerJS ``token``), and so may a ``/token/<token>/`` prefix, shown as
    ``/token/***/``; the remote address is ``request.remote``, the client's own
    behind a trusted proxy (``TRUSTED_PROXIES``). In JSON the parts are fields as well:
    ``method``, ``path``, ``status``, ``bytes``, ``duration_ms``, ``remote``."""

    def log(self, request: BaseRequest, response: StreamResponse, time: float) -> None:
        path = request.rel_url.raw_path
        if path.startswith("/token/"):  # a token as a path prefix (server/auth.py): hidden
            path = "/token/***" + path[7:].partition("/")[1] + path[7:].partition("/")[2]
        if len(path) > MAX_PATH:
            path = path[:MAX_PATH] + "..."
        level = logging.DEBUG if path in PROBES else logging.INFO
        if not self.logger.isEnabledFor(level):
            return
        duration = round(time * 1000, 1)
        size = response.body_length
        self.logger.log(
            level,
            "%s %s %d %d bytes %.1f ms",
            request.method,
            path,
            response.status,
            size,
            duration,
            extra={
                "method": request.method,
                "path": path,
                "status": response.status,
                "bytes": size,
                "duration_ms": duration,
                # The client's address behind a trusted proxy (``server/frontdoor.py`` puts
                # it there), else the peer's.
                "remote": request.get(CLIENT_KEY, request.remote),
            },
        )

    @property
    def enabled(self) -> bool:
        return self.logger.isEnabledFor(logging.INFO)


def access_log_options(enabled: bool) -> dict[str, Any]:
    """aiohttp's ``AppRunner`` arguments for the access log: on (``AccessLogger`` on
    ``polysignal.access``) or off (``ACCESS_LOG=0``)."""
    return {"access_log": access_log if enabled else None, "access_log_class": AccessLogger}


def elide(payload: bytes | str) -> str:
    """How a payload appears in a DEBUG line: its size only."""
    return f"<{len(payload)} bytes>"
