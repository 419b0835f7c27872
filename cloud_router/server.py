"""A router process: two discovery watchers (edge and central tiers) feeding the app, and,
with a fleet key, the identity verifier that admits only endpoints proving the key."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging

from cloud_router.app import build_app
from cloud_router.discovery import ServiceWatcher
from cloud_router.endpoints import CENTRAL_SERVICE, EDGE_SERVICE
from cloud_router.front import FrontConfig, FrontServer
from cloud_router.proxy import ForwardedPaths
from cloud_router.settings import RouterSettings
from cloud_router.verifier import IdentityVerifier

log = logging.getLogger(__name__)


def router_app(settings: RouterSettings):
    """The app with its watchers; they run for the app's lifespan."""
    watchers = [ServiceWatcher(settings.consul, name, near=settings.near,
                               token=settings.consul_token)
                for name in (EDGE_SERVICE, CENTRAL_SERVICE)]
    verifier = (IdentityVerifier(watchers, settings.fleet_key, settings.identity)
                if settings.fleet_key else None)

    @contextlib.asynccontextmanager
    async def run_watchers():
        tasks = [asyncio.create_task(w.run(), name=f"watch-{w.service}") for w in watchers]
        # Serve at once, but give discovery a moment so the first requests see a table.
        await asyncio.gather(*(w.wait_loaded(5.0) for w in watchers))
        if verifier is not None:
            await verifier.check_due_once()   # the first table already knows who is who
            tasks.append(asyncio.create_task(verifier.run(), name="identity-verifier"))
        log.info("router started", extra={
            "consul": settings.consul, "consul_token": settings.consul_token is not None,
            "fleet_key": verifier is not None,
            "endpoints": sum(len(w.endpoints) for w in watchers)})
        try:
            yield
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    app = build_app(settings, watchers,
                    ready=lambda: all(w.loaded for w in watchers),
                    lifespan_tasks=run_watchers)
    if verifier is not None:
        app.state.table.set_gate(verifier)
        verifier.register_metrics(app.state.metrics.registry)
    return app


def front_server(app: ForwardedPaths, host: str, port: int, *, install_signals: bool = True,
                 reuse_port: bool = False, on_started=None) -> FrontServer:
    """How the router is served (the tests serve it the same way, in a thread, where signals
    cannot be caught)."""
    return FrontServer(app, host, port, FrontConfig(max_body_bytes=app.settings.max_body_bytes),
                       install_signals=install_signals, reuse_port=reuse_port,
                       on_started=on_started)


def serve(settings: RouterSettings, *, reuse_port: bool = False, on_started=None) -> None:
    """Run the router until SIGINT/SIGTERM. ``reuse_port``: one of several workers on the
    port (``cloud_router.workers``); ``on_started``: called once it listens."""
    app = router_app(settings)
    # Everything built so far lives as long as the process: out of the collector's sight, so
    # that its full collections under load walk only what requests allocate.
    gc.freeze()
    front_server(app, settings.host, settings.port, reuse_port=reuse_port,
                 on_started=on_started).run()
