"""``polysignal serve --workers N``: N processes sharing one port and one Redis.

Each worker is a full node (its own event loop, connections and node id ``{NODE_ID}-{i}``)
listening on the same port with SO_REUSEPORT, so the kernel spreads new connections over the
workers; the Redis backend makes them one cluster (a publish on one worker reaches subscribers on
every other, ``clients`` counts all of them). The memory backend cannot do that, so N > 1 with
it is refused at configuration time (``Settings.validate``).

The parent process only supervises: it passes each SIGTERM/SIGINT on to the workers as a
SIGTERM (the first: each drains for ``DRAIN_SECONDS``, then stops gracefully: 1001 to its
peers, presence removed; a second ends the drains at once), restarts a worker that dies
unexpectedly (giving up when they keep dying), and exits when all workers have stopped, waiting
for them at least ``DRAIN_SECONDS`` + ``SHUTDOWN_TIMEOUT`` + ``STOP_MARGIN``. A worker whose
parent disappears (SIGKILL of the parent) stops by itself. Workers run in their own process
group, so a Ctrl-C in a terminal reaches only the parent, which passes it on once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import tempfile
import time
from multiprocessing.process import BaseProcess

from aiohttp import web

from polysignal import logs
from polysignal.config import Settings
from polysignal.server.metrics import DIR_ENV as METRICS_DIR_ENV
from polysignal.server.rooms import ROOMS_KEY, secrets_for
from polysignal.server.runner import loop_factory
from polysignal.server.runner import serve as serve_node

log = logging.getLogger("polysignal.workers")

RESTART_WINDOW = 60.0
"""Seconds over which unexpected worker exits are counted."""
MAX_RESTARTS = 5
"""Unexpected exits within RESTART_WINDOW after which the parent gives up and stops."""
POLL = 0.2
"""Seconds between checks of the workers' state."""
POLLING_REFUSED = (
    "Bad request: long-polling is not available with --workers > 1; use the websocket transport"
)
"""The engine.io error a long-polling handshake gets from a worker (docs/operations/drain.md)."""
STOP_MARGIN = 5.0
"""Seconds the parent waits for its workers to stop beyond their drain and shutdown timeout,
before it kills them."""


def worker_settings(settings: Settings, index: int, port: int) -> Settings:
    """The settings of worker ``index`` (1-based): its own node id, the shared port."""
    return settings.replace(node_id=f"{settings.server.node_id}-{index}", port=port, workers=1)


def run_workers(settings: Settings) -> int:
    """Run ``settings.server.workers`` worker processes until SIGTERM/SIGINT; the exit status."""
    # Port 0 means "any free port": pick it here so every worker binds the same one. The
    # reserving socket stays open (bound, not listening) so no other program takes the port.
    reserve = None
    port = settings.server.port
    if port == 0:
        reserve = socket.socket(socket.AF_INET6 if ":" in settings.server.host else socket.AF_INET)
        reserve.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        reserve.bind((settings.server.host, 0))
        port = reserve.getsockname()[1]
    context = multiprocessing.get_context("spawn")
    # ``/metrics`` on any worker shows every worker's numbers: the workers (spawned, so they
    # inherit the environment) exchange snapshots in this directory (server/metrics.py).
    metrics_dir = tempfile.mkdtemp(prefix="polysignal-metrics-")
    os.environ[METRICS_DIR_ENV] = metrics_dir
    stopping = False
    signals = 0  # SIGTERM/SIGINT received
    passed_on = False  # the workers got the first one

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stopping, signals
        stopping = True
        signals += 1
        if passed_on:  # a second signal: the workers end their drains at once
            log.info("signal %d again: passing it on to end the drain", signum)
            _signal_all(list(workers.values()))

    def on_hangup(_signum: int, _frame: object) -> None:
        # SIGHUP reloads the TLS certificate (server/tls.py): each worker reloads its own. A
        # worker without TLS has no use for it (and would be ended by it).
        if settings.server.tls_cert:
            log.info("SIGHUP: passing it on to the workers (TLS reload)")
            _signal_all(list(workers.values()), signal.SIGHUP)
        else:
            log.info("SIGHUP ignored: there is no TLS certificate to reload")

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, on_hangup)
    workers: dict[int, BaseProcess] = {}
    exits: list[float] = []
    status = 0

    def spawn(index: int) -> None:
        proc = context.Process(
            target=_worker_main,
            args=(worker_settings(settings, index, port), os.getpid()),
            name=f"polysignal-worker-{index}",
        )
        proc.start()
        workers[index] = proc
        log.info("worker %d/%d started (pid %s)", index, settings.server.workers, proc.pid)

    try:
        for index in range(1, settings.server.workers + 1):
            spawn(index)
        log.info("%d workers serving port %d", settings.server.workers, port)
        if secrets_for(settings.rooms) is not None:
            log.info(
                "socket.io long-polling is refused under --workers (a session's requests would "
                "reach any worker): clients use the websocket transport"
            )
        while not stopping:
            time.sleep(POLL)
            for index, proc in list(workers.items()):
                if proc.is_alive() or stopping:
                    continue
                now = time.monotonic()
                exits[:] = [t for t in exits if now - t < RESTART_WINDOW] + [now]
                log.error("worker %d exited unexpectedly (status %s)", index, proc.exitcode)
                if len(exits) > MAX_RESTARTS:
                    log.error("workers keep exiting; stopping")
                    stopping = True
                    status = 1
                    break
                spawn(index)
        log.info("stopping %d workers", len(workers))
        _signal_all(list(workers.values()))
        passed_on = True
        if signals > 1:  # the second arrived before the first was passed on
            _signal_all(list(workers.values()))
        grace = settings.server.drain_seconds + settings.server.shutdown_timeout + STOP_MARGIN
        _wait_all(list(workers.values()), grace)
        if any(proc.exitcode not in (0, None) for proc in workers.values()):
            status = status or 1
    finally:
        _stop_all(list(workers.values()), 1.0)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if reserve is not None:
            reserve.close()
        os.environ.pop(METRICS_DIR_ENV, None)
        shutil.rmtree(metrics_dir, ignore_errors=True)
    return status


def _signal_all(workers: list[BaseProcess], signum: int = signal.SIGTERM) -> None:
    """Send ``signum`` (SIGTERM) to every live worker."""
    for proc in workers:
        if proc.is_alive() and proc.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signum)


def _stop_all(workers: list[BaseProcess], grace: float) -> None:
    """SIGTERM every live worker, wait up to ``grace`` seconds, then SIGKILL the rest."""
    _signal_all(workers)
    _wait_all(workers, grace)


def _wait_all(workers: list[BaseProcess], grace: float) -> None:
    """Wait up to ``grace`` seconds for every worker to exit, then SIGKILL the rest."""
    deadline = time.monotonic() + grace
    for proc in workers:
        proc.join(max(0.0, deadline - time.monotonic()))
        if proc.is_alive():
            log.warning("worker pid %s did not stop in %.0fs; killing it", proc.pid, grace)
            proc.kill()
            proc.join(5.0)


def refuse_long_polling(app: web.Application) -> None:
    """Refuse socket.io long-polling handshakes on a worker's rooms protocol (400, engine.io's
    error ``{"code":3,"message":POLLING_REFUSED}``), WebSocket ones go on as before.

    A long-polling session is many HTTP requests, each on whichever worker the kernel hands its
    TCP connection to (SO_REUSEPORT spreads connections, not sessions), and a session lives in
    the one worker that made it: measured with 2 workers, 12 of 20 requests after a handshake
    met the other worker and got 400 "Invalid session". A WebSocket session is one connection,
    so it stays on its worker.
    """
    hub = app.get(ROOMS_KEY)
    if hub is not None:
        hub.sio.eio.polling_refused = POLLING_REFUSED


def _worker_main(settings: Settings, parent_pid: int) -> None:
    """Entry point of one worker process."""
    # Out of the parent's process group: a Ctrl-C in a terminal reaches the whole group, and the
    # parent passes it on as well; two signals would end the drain at once.
    os.setpgrp()
    # A SIGHUP (passed on by the parent for a TLS reload) must not end a worker still starting:
    # ignored until the TLS watcher takes it over (server/tls.py).
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    logs.configure(settings.server.log_level, settings.server.log_format)
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        runner.run(_serve_until_orphaned(settings, parent_pid))


async def _serve_until_orphaned(settings: Settings, parent_pid: int) -> None:
    stop = asyncio.Event()

    async def watch_parent() -> None:
        while not stop.is_set():
            if os.getppid() != parent_pid:
                log.warning("parent process %d is gone; stopping", parent_pid)
                stop.set()
                return
            await asyncio.sleep(1.0)

    watcher = asyncio.get_running_loop().create_task(watch_parent())
    try:
        await serve_node(settings, reuse_port=True, stop=stop, prepare=refuse_long_polling)
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
