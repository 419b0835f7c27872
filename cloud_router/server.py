"""A router process: two discovery watchers (edge and central tiers) feeding the app."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import uvicorn

from cloud_router.app import build_app
from cloud_router.discovery import ServiceWatcher
from cloud_router.endpoints import CENTRAL_SERVICE, EDGE_SERVICE
from cloud_router.settings import RouterSettings

log = logging.getLogger(__name__)


def router_app(settings: RouterSettings):
    """The app with its watchers; they run for the app's lifespan."""
    watchers = [ServiceWatcher(settings.consul, name, near=settings.near)
                for name in (EDGE_SERVICE, CENTRAL_SERVICE)]

    @contextlib.asynccontextmanager
    async def run_watchers():
        tasks = [asyncio.create_task(w.run(), name=f"watch-{w.service}") for w in watchers]
        # Serve at once, but give discovery a moment so the first requests see a table.
        await asyncio.gather(*(w.wait_loaded(5.0) for w in watchers))
        log.info("router started", extra={"consul": settings.consul, "endpoints": sum(
            len(w.endpoints) for w in watchers)})
        try:
            yield
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    return build_app(settings, watchers,
                     ready=lambda: all(w.loaded for w in watchers),
                     lifespan_tasks=run_watchers)


def serve(settings: RouterSettings) -> None:
    """Run the router until SIGINT/SIGTERM."""
    uvicorn.run(router_app(settings), host=settings.host, port=settings.port,
                log_config=None, access_log=False, timeout_keep_alive=30)
