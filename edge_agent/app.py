"""Build the agent's FastAPI app from AgentSettings: load the bundle, serve it, register it.

The lifespan loads the bundle (a directory, or a URL fetched into the content-addressed
store) and its engine, then starts Consul registration and the MQTT bridge when they are
configured (imported lazily: each is optional). On shutdown it drains in-flight requests
(up to ``drain_timeout``), stops the bridge, deregisters and frees the model.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from fastapi import FastAPI

from edge_agent.api_router import router
from edge_agent.bundle import Bundle
from edge_agent.bundle_fetch import is_url, resolve_bundle
from edge_agent.errors import AgentError
from edge_agent.metrics import AgentMetrics
from edge_agent.protocol import ErrorResult, error
from edge_agent.serving import LoadedModel, OpenAIServing, load_model
from edge_agent.settings import AgentSettings

log = logging.getLogger(__name__)


class NodeHeaders:
    """ASGI middleware: x-edgegen-node and x-edgegen-tier on every response (streams too)."""

    def __init__(self, app, node: str, tier: str):
        self.app = app
        self.extra = [(b"x-edgegen-node", node.encode()), (b"x-edgegen-tier", tier.encode())]

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *self.extra]}
            await send(message)

        await self.app(scope, receive, send_with_headers)


def create_app(settings: AgentSettings, model: LoadedModel | None = None) -> FastAPI:
    """The agent's app; ``model`` is loaded in the lifespan unless the caller preloaded it."""
    metrics = AgentMetrics()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        loaded = model
        if loaded is None:
            bundle = await asyncio.to_thread(resolve_bundle, settings.bundle, settings.store)
            loaded = await asyncio.to_thread(load_model, bundle, settings)
        bundle = loaded.bundle
        serving = OpenAIServing(settings, loaded, metrics)
        app.state.serving = serving
        registration = bridge = leaving = None
        try:
            if settings.consul:
                from edge_agent.registration import ConsulRegistration

                registration = ConsulRegistration(settings, bundle)
                await registration.start()
            if settings.mqtt:
                from edge_agent.mqtt_bridge import MqttBridge

                bridge = MqttBridge(settings, serving)
                await bridge.start()

            async def swap_bundle(body: dict) -> ErrorResult | Bundle:
                source = body.get("path") or body.get("url") if isinstance(body, dict) else None
                if not isinstance(source, str) or not source:
                    return error(400, "give the new bundle as {\"path\": DIR} or {\"url\": URL}",
                                 param="path")
                if is_url(source):
                    try:
                        fetched = await asyncio.to_thread(resolve_bundle, source, settings.store)
                    except AgentError as exc:
                        return error(400, f"bundle refused: {exc}", param="url",
                                     code="bad_bundle")
                    source = str(fetched.path)
                result = await serving.swap(source)
                if isinstance(result, Bundle) and registration is not None \
                        and hasattr(registration, "update"):
                    await registration.update(result)
                return result

            app.state.swap_bundle = swap_bundle
            leaving = asyncio.create_task(_leave_on_drain(serving, registration, bridge))
            log.info("agent ready", extra={"bundle": bundle.name, "digest": bundle.digest12,
                                           "node": settings.node, "port": settings.port})
            yield
        finally:
            serving.draining = True
            if leaving is not None:
                await leaving
            if not await _drain(serving, settings.drain_timeout):
                log.warning("shutdown: requests still in flight after the drain timeout")
            if bridge is not None:
                await bridge.stop()
            if registration is not None:
                await registration.stop()
            await serving.model.close()

    app = FastAPI(title="edgegen agent", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.settings = settings
    app.state.metrics = metrics
    app.include_router(router)
    app.add_middleware(NodeHeaders, node=settings.node, tier=settings.tier)
    return app


async def _leave_on_drain(serving: OpenAIServing, registration, bridge) -> None:
    """The moment a drain begins (SIGTERM), stop attracting work: deregister from Consul (the
    router stops choosing this agent now, not when its check next fails) and leave the MQTT
    shared group. Requests already in flight still finish."""
    while not serving.draining:
        await asyncio.sleep(0.1)
    if bridge is not None:
        await bridge.leave_shared()
    if registration is not None:
        await registration.stop()


async def _drain(serving: OpenAIServing, timeout: float) -> bool:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while serving.inflight():
        if loop.time() >= deadline:
            return False
        await asyncio.sleep(0.05)
    return True

