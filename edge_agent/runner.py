"""Run the agent under uvicorn with a graceful drain on SIGTERM.

On the first SIGTERM/SIGINT the agent stops being ready (``/readyz`` answers 503 at once, so
Consul and the router stop sending), keeps serving what is in flight for up to
``drain_timeout`` seconds, then uvicorn shuts down and the process exits 0. A second
signal exits at once.
"""

from __future__ import annotations

import dataclasses
import logging
import time

import uvicorn

from edge_agent.app import create_app
from edge_agent.bundle import open_bundle
from edge_agent.bundle_fetch import Progress, resolve_bundle
from edge_agent.engine import providers_for
from edge_agent.serving import load_model
from edge_agent.settings import AgentSettings

log = logging.getLogger(__name__)


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, drain_timeout: float):
        super().__init__(config)
        self.drain_timeout = drain_timeout
        self.drain_deadline: float | None = None

    def handle_exit(self, sig, frame) -> None:
        if self.drain_deadline is None and self.started:
            self.drain_deadline = time.monotonic() + self.drain_timeout
            serving = getattr(self.config.app.state, "serving", None)
            if serving is not None:
                serving.draining = True
            log.info("draining before shutdown", extra={"signal": int(sig)})
            return
        super().handle_exit(sig, frame)

    async def on_tick(self, counter: int) -> bool:
        if self.drain_deadline is not None and not self.should_exit:
            serving = getattr(self.config.app.state, "serving", None)
            idle = serving is None or serving.inflight() == 0
            if idle or time.monotonic() >= self.drain_deadline:
                self.should_exit = True
        return await super().on_tick(counter)


def prepare(settings: AgentSettings, progress: Progress | None = None) -> AgentSettings:
    """Fail fast with a clear error (device, bundle) and pin a fetched URL to its directory."""
    providers_for(settings.device)
    bundle = resolve_bundle(settings.bundle, settings.store, progress=progress)
    return dataclasses.replace(settings, bundle=str(bundle.path))


def run_agent(settings: AgentSettings) -> None:
    # Load before uvicorn starts, so a model that cannot load is one clear error line
    # (the CLI's), not a traceback from uvicorn's lifespan handler.
    model = load_model(open_bundle(settings.bundle), settings)
    app = create_app(settings, model)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_config=None,
                            lifespan="on", timeout_graceful_shutdown=int(settings.drain_timeout),
                            access_log=False)
    DrainingServer(config, settings.drain_timeout).run()
