"""``polysignal`` command line: ``serve`` and helpers. Every setting (``config.FIELDS``) is also a
flag (``PORT`` -> ``--port``, ``MAX_FRAME_BYTES`` -> ``--max-frame-bytes``); flags win over the
environment."""

from __future__ import annotations

import argparse
import asyncio
import errno
import logging
import os
import socket
import sys
from collections.abc import Sequence
from typing import Any

from polysignal import __version__
from polysignal.config import FIELDS, ConfigError, Settings, config_table, parse_bool
from polysignal.serverless import commands as serverless_commands


def _flag(env: str) -> str:
    return "--" + {"BACKEND": "backend"}.get(env, env.lower().replace("_", "-"))


def _add_setting_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("settings (each overrides its environment variable)")
    for spec in FIELDS:
        if spec.parse is parse_bool:
            group.add_argument(
                _flag(spec.env),
                dest=spec.name,
                action="store_const",
                const=True,
                default=None,
                help=f"{spec.doc} [{spec.env}]",
            )
        else:
            group.add_argument(
                _flag(spec.env),
                dest=spec.name,
                metavar=spec.env,
                default=None,
                help=f"{spec.doc} [{spec.env}]",
            )


def _settings_from(args: argparse.Namespace) -> Settings:
    overrides: dict[str, Any] = {}
    for spec in FIELDS:
        raw = getattr(args, spec.name, None)
        if raw is None:
            continue
        overrides[spec.name] = raw if isinstance(raw, bool) else spec.parse(spec.env, raw)
    return Settings.from_env(**overrides)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="polysignal", description=__doc__)
    parser.add_argument("--version", action="version", version=f"polysignal {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the signaling server")
    _add_setting_flags(serve)
    sub.add_parser("config-table", help="print the Markdown table of every setting")
    serverless_commands.add_parsers(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "config-table":
        sys.stdout.write(config_table())
        return 0
    if args.command in serverless_commands.COMMANDS:
        return serverless_commands.run(args)
    try:
        settings = _settings_from(args)
    except ConfigError as exc:
        return fail(f"configuration error: {exc}")
    server = settings.server
    if args.command == "serve":
        # Before anything starts: a port in use or a host that is not this machine's is one
        # line, not a traceback after the backend has started (docs/operations.md, Logs).
        problem = check_listen(server.host, server.port, reuse_port=server.workers > 1)
        if problem is not None:
            return fail(f"cannot listen: {problem}")
    from polysignal import logs

    logs.configure(server.log_level, server.log_format)
    if settings.rooms.rooms_dev:
        _log_dev_host(server.host, explicit=args.host is not None or bool(os.environ.get("HOST")))
    if args.command == "serve":
        if server.workers > 1:  # N processes sharing the port (server/workers.py)
            from polysignal.server.workers import run_workers

            return run_workers(settings)
        return _serve(settings)
    return 2  # pragma: no cover - argparse rejects unknown commands


def fail(message: str) -> int:
    """A startup error: one line on stderr, exit status 2."""
    print(f"polysignal: {message}", file=sys.stderr)
    return 2


_LISTEN_ERRORS = (errno.EADDRINUSE, errno.EADDRNOTAVAIL, errno.EACCES)


def listen_error(host: str, port: int, exc: OSError) -> str | None:
    """What is wrong with ``HOST``/``PORT`` when binding them failed with ``exc``, in one line
    naming the setting; None for an error that is not about them."""
    if isinstance(exc, socket.gaierror):
        reason = exc.strerror or str(exc)
        return f"HOST {host}: not an IP address or a name that resolves ({reason})"
    if exc.errno == errno.EADDRINUSE:
        return f"PORT {port}: address already in use"
    if exc.errno == errno.EACCES:
        return f"PORT {port}: permission denied (ports below 1024 need privileges)"
    if exc.errno == errno.EADDRNOTAVAIL:
        return f"HOST {host}: not an address of this machine"
    return None


def check_listen(host: str, port: int, *, reuse_port: bool = False) -> str | None:
    """Bind ``host:port`` as the server will (``SO_REUSEADDR``, and ``SO_REUSEPORT`` for
    ``--workers``), then let it go: what is wrong (``listen_error``), or None. Port 0 (any free
    port) is only resolved."""
    try:
        infos = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
        for family, kind, proto, _, address in dict.fromkeys(infos):
            if port == 0:
                break
            with socket.socket(family, kind, proto) as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if reuse_port:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind(address)
    except OSError as exc:
        problem = listen_error(host, port, exc)
        return problem if problem is not None else f"HOST {host}, PORT {port}: {exc}"
    return None


def _serve(settings: Settings) -> int:
    """One node in this process until SIGTERM/SIGINT (``runner.run``), with a port taken between
    ``check_listen`` and the bind still reported as one line."""
    from polysignal.server.runner import loop_factory, serve

    listening = False

    def on_listening(_port: int) -> None:
        nonlocal listening
        listening = True

    try:
        with asyncio.Runner(loop_factory=loop_factory()) as runner:
            runner.run(serve(settings, on_listening=on_listening))
    except OSError as exc:
        problem = (
            None if listening else listen_error(settings.server.host, settings.server.port, exc)
        )
        if problem is None:
            raise
        return fail(f"cannot listen: {problem}")
    return 0


def _log_dev_host(host: str, *, explicit: bool) -> None:
    """Say where ``ROOMS_DEV=1``, whose secrets are printed, listens (``config.DEV_HOST``)."""
    log = logging.getLogger("polysignal.rooms")
    if explicit:
        log.warning(
            "ROOMS_DEV=1 with HOST=%s set explicitly: the development secrets are usable from "
            "every network that reaches it",
            host,
        )
    else:
        log.info("ROOMS_DEV=1: listening on %s only; set HOST to listen elsewhere", host)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
