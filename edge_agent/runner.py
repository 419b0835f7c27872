"""Run the agent under uvicorn with a graceful drain on SIGTERM.

On the first SIGTERM/SIGINT the agent begins its drain (``ModelHost.begin_drain``: ``/readyz``
answers 503 at once, so Consul and the router stop sending), keeps serving what is in flight
for up to ``drain_timeout`` seconds, then uvicorn shuts down and the process exits 0. A second
signal exits at once.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging

import uvicorn

from edge_agent.app import create_app
from edge_agent.bundle.fetch import Progress, resolve_bundle
from edge_agent.bundle.signing import load_trust, open_trusted
from edge_agent.rest.limits import DEFAULT_HEAD_TIMEOUT_S, head_timeout_protocol
from edge_agent.engine.ort import providers_for
from edge_agent.serving.lifecycle import load_model
from edge_agent.settings import AgentSettings

log = logging.getLogger(__name__)


class DrainingServer(uvicorn.Server):
    """uvicorn's server, with a drain before the shutdown that the first signal asks for."""

    def __init__(self, config: uvicorn.Config, drain_timeout: float):
        super().__init__(config)
        self.drain_timeout = drain_timeout
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_requested = False
        self._drain: asyncio.Task | None = None   # referenced until done

    async def startup(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets)

    def handle_exit(self, sig, frame) -> None:
        # Runs in the signal handler, outside any loop callback: hand the drain to the loop
        # (call_soon_threadsafe also wakes it), then let uvicorn exit when it is idle.
        if not self._drain_requested and self.started and self._loop is not None:
            self._drain_requested = True
            self._loop.call_soon_threadsafe(self._begin_drain)
            log.info("draining before shutdown", extra={"signal": int(sig)})
            return
        super().handle_exit(sig, frame)

    def _begin_drain(self) -> None:
        self._drain = asyncio.get_running_loop().create_task(self._exit_when_idle())

    async def _exit_when_idle(self) -> None:
        host = getattr(self.config.app.state, "host", None)
        if host is not None:
            host.begin_drain()
            await host.wait_idle(self.drain_timeout)
        self.should_exit = True


def prepare(settings: AgentSettings, progress: Progress | None = None) -> AgentSettings:
    """Fail fast with a clear error (device, trusted keys, bundle and its signature) and pin a
    fetched URL to its directory."""
    providers_for(settings.device)
    bundle = resolve_bundle(settings.bundle, settings.store, progress=progress,
                            trust=load_trust(settings.trust_keys))
    return dataclasses.replace(settings, bundle=str(bundle.path))


def run_agent(settings: AgentSettings) -> None:
    # Load before uvicorn starts, so a model that cannot load is one clear error line
    # (the CLI's), not a traceback from uvicorn's lifespan handler.
    model = load_model(open_trusted(settings.bundle, load_trust(settings.trust_keys)), settings)
    app = create_app(settings, model)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_config=None,
                            lifespan="on", timeout_graceful_shutdown=int(settings.drain_timeout),
                            access_log=False, http=head_timeout_protocol(DEFAULT_HEAD_TIMEOUT_S))
    DrainingServer(config, settings.drain_timeout).run()
