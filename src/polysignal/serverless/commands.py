"""The serverless subcommands of ``polysignal``: ``package-lambda`` and ``serverless-local``."""

from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path

COMMANDS = ("package-lambda", "serverless-local")
DEFAULT_ZIP = "dist/lambda.zip"


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    package = sub.add_parser(
        "package-lambda", help="build the AWS Lambda deployment zip of the serverless handler"
    )
    package.add_argument(
        "--out", default=DEFAULT_ZIP, help=f"zip to write (default: {DEFAULT_ZIP})"
    )
    package.add_argument(
        "--template",
        action="store_true",
        help="also write the SAM template.yaml beside the zip (its CodeUri naming the zip), "
        "for `sam deploy` from that directory",
    )
    local = sub.add_parser(
        "serverless-local",
        help="run the serverless handler behind a local WebSocket server (DynamoDB at "
        "AWS_DYNAMODB_ENDPOINT)",
    )
    local.add_argument("--host", default=None, help="address to listen on [HOST, 127.0.0.1]")
    local.add_argument("--port", type=int, default=None, help="TCP port [PORT, 4001]")
    local.add_argument(
        "--create-table",
        action="store_true",
        help="create TABLE_NAME (as template.yaml declares it) if it does not exist",
    )


def run(args: argparse.Namespace) -> int:
    if args.command == "package-lambda":
        from polysignal.serverless.package import build_zip, write_template

        out = Path(args.out)
        names = build_zip(out)
        print(f"wrote {out} ({len(names)} files, {out.stat().st_size} bytes)")
        if args.template:
            template = write_template(out)
            print(f"wrote {template} (cd {template.parent} && sam deploy --guided)")
        return 0
    from polysignal import logs
    from polysignal.cli import check_listen, fail
    from polysignal.config import ConfigError, Settings
    from polysignal.serverless.settings import ServerlessSettings

    try:
        settings = ServerlessSettings.from_env()
        # The local sockets get the server's per-connection limits (rate, send buffer, ping).
        server_settings = Settings.from_env()
    except ConfigError as exc:
        return fail(f"configuration error: {exc}")
    if (
        settings.dynamodb_endpoint
        and settings.access_key_id is None
        and not os.environ.get("AWS_PROFILE")
    ):
        # DynamoDB Local and moto accept any signature, but boto3 will not sign without keys.
        from polysignal.config import Secret

        settings = dataclasses.replace(
            settings, access_key_id=Secret("local"), secret_access_key=Secret("local")
        )
    if not _boto3_importable():
        return fail(
            "serverless-local needs boto3, which is not installed: "
            "pip install 'polysignal[serverless]'"
        )
    from polysignal.serverless.local import DEFAULT_PORT, run_local

    host = args.host or os.environ.get("HOST") or "127.0.0.1"
    port = args.port if args.port is not None else int(os.environ.get("PORT") or DEFAULT_PORT)
    problem = check_listen(host, port)
    if problem is not None:
        return fail(f"cannot listen: {problem}")
    logs.configure(settings.log_level, server_settings.server.log_format)
    run_local(settings, server_settings, host, port, args.create_table)
    return 0


def _boto3_importable() -> bool:
    """Whether boto3, the ``serverless`` extra, imports (the Lambda runtime ships it; the
    server does not need it)."""
    try:
        import boto3  # noqa: F401
    except ImportError:
        return False
    return True
