"""Running a node: listen, serve until SIGTERM/SIGINT, shut down gracefully.

Shutdown order: drain first when ``DRAIN_SECONDS`` > 0 (``/readyz`` 503, everything else
served as before; ``server/drain.py``), then stop accepting (the listening socket closes), drop
requests still being read, close every WebSocket with 1001, run the protocols' shutdown hooks,
then close the backend, which removes this node's presence and claims from the cluster at once.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from collections.abc import Callable

from aiohttp import web

from polysignal.config import Settings, redact_url
from polysignal.logs import access_log_options
from polysignal.server.app import DOOR_KEY, NODE_KEY, create_app
from polysignal.server.drain import DRAIN_KEY, Drain
from polysignal.server.tls import Tls

log = logging.getLogger("polysignal.server")


class NodeServer:
    """One node listening: its front door on a socket, aiohttp behind it for plain HTTP."""

    def __init__(self, app: web.Application) -> None:
        self.app = app
        self.node = app[NODE_KEY]
        self.door = app[DOOR_KEY]
        self.runner = web.AppRunner(
            app,
            handle_signals=False,
            shutdown_timeout=self.node.settings.server.shutdown_timeout,
            **access_log_options(self.node.settings.server.access_log),
        )
        self.server: asyncio.Server | None = None
        self.port = 0
        self.tls: Tls | None = None

    async def setup(self) -> None:
        """Start the application (and with it the backend), not listening yet."""
        await self.runner.setup()
        assert self.runner.server is not None
        self.door.http = self.runner.server
        self.door.start()

    async def listen(self, host: str, port: int, *, reuse_port: bool = False) -> int:
        """Accept connections on ``host:port``; the bound port (for port 0). With ``TLS_CERT``
        and ``TLS_KEY``, TLS only (https:// and wss://), the files read again on SIGHUP
        (``server/tls.py``); ConfigError naming the setting when they cannot be used."""
        loop = asyncio.get_running_loop()
        settings = self.node.settings.server
        context = None
        if settings.tls_cert and settings.tls_key:
            self.tls = Tls(settings.tls_cert, settings.tls_key)
            context = self.tls.context
        self.server = await loop.create_server(
            self.door,
            host,
            port,
            reuse_port=reuse_port or None,
            backlog=settings.backlog,
            ssl=context,
            # A handshake that does not finish holds no address slot yet: bound it as the
            # request head is bounded.
            ssl_handshake_timeout=(settings.header_timeout or None) if context else None,
        )
        if self.tls is not None:
            self.tls.watch()
        self.port = port
        for sock in self.server.sockets:
            self.port = int(sock.getsockname()[1])
            break
        return self.port

    async def start(self, host: str, port: int) -> int:
        await self.setup()
        return await self.listen(host, port)

    async def stop(self) -> None:
        """Stop accepting, then shut the node down gracefully (see the module docstring)."""
        if self.server is not None:
            self.server.close()
        if self.tls is not None:
            self.tls.unwatch()
        await self.door.stop()
        await self.runner.cleanup()


async def serve(
    settings: Settings,
    *,
    reuse_port: bool = False,
    on_listening: Callable[[int], None] | None = None,
    stop: asyncio.Event | None = None,
    prepare: Callable[[web.Application], None] | None = None,
) -> None:
    """Serve until ``stop`` is set or the process gets SIGTERM/SIGINT (then drain for
    ``DRAIN_SECONDS`` and stop). ``prepare`` adjusts the app before it starts (a worker's)."""
    app = create_app(settings)
    drain = app[DRAIN_KEY] = Drain(settings.server.drain_seconds)
    if prepare is not None:
        prepare(app)
    server = NodeServer(app)
    await server.setup()
    if reuse_port:
        await _await_backend(server, settings)
    port = await server.listen(settings.server.host, settings.server.port, reuse_port=reuse_port)
    log.info(
        "listening on %s://%s:%d (node %s, backend %s)",
        "https" if server.tls is not None else "http",
        settings.server.host,
        port,
        settings.server.node_id,
        redact_url(settings.server.backend_url),
    )
    if on_listening is not None:
        on_listening(port)
    await run_until_signalled(
        server,
        stop,
        on_stop=lambda: log.info("shutting down: closing connections with 1001"),
        drain=drain,
    )


async def _await_backend(server: NodeServer, settings: Settings) -> None:
    """A worker sharing the port waits (bounded) for its backend before it takes connections,
    so the kernel does not hand peers to a worker that cannot reach the other workers yet."""
    backend = server.node.backend
    wait = settings.server.backend_wait
    for _ in range(int(wait / 0.05)):
        if backend.ready:
            return
        await asyncio.sleep(0.05)
    if not backend.ready:
        log.warning(
            "backend %s not reachable after %gs; listening anyway (local delivery only)",
            redact_url(settings.server.backend_url),
            wait,
        )


async def run_until_signalled(
    server: NodeServer,
    stop: asyncio.Event | None = None,
    on_stop: Callable[[], None] | None = None,
    drain: Drain | None = None,
) -> None:
    """Serve until ``stop`` is set or SIGTERM/SIGINT arrives, drain (``server/drain.py``: a
    second signal ends the drain at once), then stop ``server``.

    The handlers stay installed until the stop is done, so a repeated signal does not kill the
    process halfway through releasing its cluster state.
    """
    stop = stop or asyncio.Event()
    drain = drain or Drain(0.0)
    loop = asyncio.get_running_loop()

    def on_signal() -> None:
        if stop.is_set():
            drain.cut()
        else:
            stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    try:
        await stop.wait()
        await drain.run()
        if on_stop is not None:
            on_stop()
    finally:
        await server.stop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        log.info("stopped")


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's event loop when present, else asyncio's default."""
    if sys.platform != "win32":
        try:
            import uvloop

            return uvloop.new_event_loop
        except ImportError:  # pragma: no cover - uvloop is a dependency
            return None
    return None  # pragma: no cover


def run(settings: Settings, *, reuse_port: bool = False) -> None:
    """Blocking entry point of one node's process, on uvloop when present (``polysignal serve``
    with one worker; each worker of ``server/workers.py`` runs ``serve`` the same way)."""
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        runner.run(serve(settings, reuse_port=reuse_port))
