"""``polysignal`` command line: ``serve`` and helpers. Every setting (``config.FIELDS``) is also a
flag (``PORT`` -> ``--port``, ``MAX_FRAME_BYTES`` -> ``--max-frame-bytes``); flags win over the
environment."""

from __future__ import annotations

import argparse
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
        print(f"polysignal: configuration error: {exc}", file=sys.stderr)
        return 2
    from polysignal import logs

    logs.configure(settings.server.log_level)
    if args.command == "serve":
        if settings.server.workers > 1:  # N processes sharing the port (server/workers.py)
            from polysignal.server.workers import run_workers

            return run_workers(settings)
        from polysignal.server.runner import run

        run(settings)
        return 0
    return 2  # pragma: no cover - argparse rejects unknown commands


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
