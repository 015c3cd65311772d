"""The serverless shape: the topics protocol on AWS API Gateway WebSockets, Lambda and DynamoDB.

``polysignal.serverless.handler`` is the Lambda handler (template.yaml); it is configured from
the environment on the first invocation and reused while the Lambda stays warm. See
docs/serverless.md for deployment, the table design, local mode and every variable.

The handler's modules are imported on first use, so ``polysignal``'s command line can offer the
serverless subcommands without loading them.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from polysignal.serverless.service import Response, SignalingHandler, build_handler

__all__ = ["SignalingHandler", "build_handler", "handler"]

_handler: SignalingHandler | None = None
_lock = threading.Lock()


def handler(event: Any, context: Any = None) -> Response:
    """AWS Lambda entry point for the ``$connect``, ``$disconnect`` and ``$default`` routes."""
    global _handler
    if _handler is None:
        with _lock:
            if _handler is None:
                from polysignal.serverless.service import build_handler

                _handler = build_handler()
    return _handler(event, context)


def __getattr__(name: str) -> Any:
    if name in ("SignalingHandler", "build_handler"):
        from polysignal.serverless import service

        return getattr(service, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
