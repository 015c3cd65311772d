"""``polysignal serve --workers N``: N processes sharing one port and one Redis.

Each worker is a full node (its own event loop, connections and node id ``{NODE_ID}-{i}``)
listening on the same port with SO_REUSEPORT, so the kernel spreads new connections over the
workers; the Redis backend makes them one cluster (a publish on one worker reaches subscribers on
every other, ``clients`` counts all of them). The memory backend cannot do that, so N > 1 with
it is refused at configuration time (``Settings.validate``).

The parent process only supervises: it forwards SIGTERM/SIGINT to the workers (each stops
gracefully: 1001 to its peers, presence removed), restarts a worker that dies unexpectedly
(giving up when they keep dying), and exits when all workers have stopped. A worker whose
parent disappears (SIGKILL of the parent) stops by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import signal
import socket
import time
from multiprocessing.process import BaseProcess

from polysignal import logs
from polysignal.config import Settings
from polysignal.server.runner import loop_factory
from polysignal.server.runner import serve as serve_node

log = logging.getLogger("polysignal.workers")

RESTART_WINDOW = 60.0
"""Seconds over which unexpected worker exits are counted."""
MAX_RESTARTS = 5
"""Unexpected exits within RESTART_WINDOW after which the parent gives up and stops."""
POLL = 0.2
"""Seconds between checks of the workers' state."""


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
    stopping = False

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
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
        _stop_all(list(workers.values()), settings.server.shutdown_timeout + 5.0)
        if any(proc.exitcode not in (0, None) for proc in workers.values()):
            status = status or 1
    finally:
        _stop_all(list(workers.values()), 1.0)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if reserve is not None:
            reserve.close()
    return status


def _stop_all(workers: list[BaseProcess], grace: float) -> None:
    """SIGTERM every live worker, wait up to ``grace`` seconds, then SIGKILL the rest."""
    for proc in workers:
        if proc.is_alive() and proc.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for proc in workers:
        proc.join(max(0.0, deadline - time.monotonic()))
        if proc.is_alive():
            log.warning("worker pid %s did not stop in %.0fs; killing it", proc.pid, grace)
            proc.kill()
            proc.join(5.0)


def _worker_main(settings: Settings, parent_pid: int) -> None:
    """Entry point of one worker process."""
    logs.configure(settings.server.log_level)
    # A Ctrl-C in a terminal reaches the whole process group; the parent's SIGTERM follows it,
    # and serve() handles both the same way.
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
        await serve_node(settings, reuse_port=True, stop=stop)
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
