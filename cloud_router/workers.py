"""Several router processes on one port (``edgegen router --workers N``), as Envoy runs a
worker per core: the kernel spreads connections over the workers' sockets (``SO_REUSEPORT``),
and each worker holds its own table, policy state and discovery watchers.

One Python process forwards on one core; a second worker uses the second core of a small
node. What workers share is the metrics: counters and histograms are kept in files under a
directory made for the run (prometheus-client's multiprocess mode), so a scrape of any
worker counts the whole router; the endpoint gauges are the scraped worker's own view.

This module is the parent: it sets the directory before any worker starts (prometheus-client
reads it when a process first imports it; the parent makes no metrics), starts the workers
(spawned: a fresh interpreter, the settings passed through a pipe, so no secret shows in a
process listing), restarts one that dies, and on SIGINT/SIGTERM stops them all and waits.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import tempfile
import time
from collections.abc import Callable

from cloud_router.errors import RouterError
from cloud_router.metrics import MULTIPROC_ENV

log = logging.getLogger(__name__)

_STOP_WAIT_S = 30.0


def _worker(settings, ready, errors, setup_logging: Callable[[], None]) -> None:
    setup_logging()   # a spawned process starts with none of the parent's handlers
    from cloud_router.server import serve  # after the parent set the metrics directory

    try:
        serve(settings, reuse_port=True, on_started=ready.set)
    except RouterError as exc:   # the parent says it, once
        errors.put(str(exc))
        raise SystemExit(1) from None


def run_workers(settings, workers: int, setup_logging: Callable[[], None]) -> None:
    """Runs ``workers`` router processes until SIGINT/SIGTERM. RouterError when a worker could
    not start (the port taken, a bad setting): the others are stopped. ``setup_logging``
    (picklable: a module's function) configures each worker's logging as the parent's."""
    ctx = multiprocessing.get_context("spawn")
    errors = ctx.SimpleQueue()
    stopping = False

    def stop(_signum, _frame) -> None:
        nonlocal stopping
        stopping = True

    with tempfile.TemporaryDirectory(prefix="edgegen-router-metrics-") as metrics_dir:
        os.environ[MULTIPROC_ENV] = metrics_dir
        procs: list = []

        def start() -> tuple:
            ready = ctx.Event()
            p = ctx.Process(target=_worker, name="edgegen-router-worker", daemon=False,
                            args=(settings, ready, errors, setup_logging))
            p.start()
            return p, ready

        previous = [signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)]
        try:
            procs = [start() for _ in range(workers)]
            log.info("router workers started", extra={"workers": workers,
                                                      "port": settings.port})
            while not stopping:
                multiprocessing.connection.wait([p.sentinel for p, _ in procs], timeout=0.2)
                for i, (p, ready) in enumerate(procs):
                    if p.is_alive() or stopping:
                        continue
                    if not ready.is_set():   # it never served: starting again would fail too
                        why = errors.get() if not errors.empty() else f"exit code {p.exitcode}"
                        raise RouterError(f"a router worker could not start: {why}")
                    log.warning("a router worker died; starting another",
                                extra={"exitcode": p.exitcode})
                    procs[i] = start()
        finally:
            for p, _ in procs:
                if p.is_alive():
                    p.terminate()   # SIGTERM: each worker drains as a single router does
            deadline = time.monotonic() + _STOP_WAIT_S
            for p, _ in procs:
                p.join(max(0.0, deadline - time.monotonic()))
                if p.is_alive():
                    p.kill()
                    p.join()
            for s, handler in zip((signal.SIGINT, signal.SIGTERM), previous):
                signal.signal(s, handler)
            os.environ.pop(MULTIPROC_ENV, None)
