"""Build the agent's FastAPI app from AgentSettings: load the bundle, serve it, register it.

This module composes the parts; it holds no logic of its own. The lifespan loads the bundle
(a directory, or a URL fetched into the content-addressed store) and its engine into a
``ModelHost``, then starts Consul registration and the MQTT bridge when they are configured
(imported lazily: each is optional). The moment a drain begins (``ModelHost.draining``, set
by SIGTERM or shutdown) the agent deregisters and leaves the MQTT shared group; on shutdown
it waits for in-flight requests (up to ``drain_timeout``), stops the bridge, deregisters and
frees the model.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from fastapi import FastAPI

from edge_agent.bundle import Bundle
from edge_agent.bundle.fetch import is_url, resolve_bundle
from edge_agent.bundle.signing import load_trust
from edge_agent.errors import AgentError
from edge_agent.metrics import AgentMetrics
from edge_agent.rest.limits import BodyLimit
from edge_agent.rest import identity
from edge_agent.rest.middleware import NodeHeaders
from edge_agent.rest.openapi import openapi_schema
from edge_agent.rest.router import openai_http_errors, router
from edge_agent.serving.api import OpenAIServing
from edge_agent.serving.lifecycle import LoadedModel, ModelHost, load_model
from edge_agent.serving.protocol import ErrorResult, error
from edge_agent.settings import AgentSettings

log = logging.getLogger(__name__)


def create_app(settings: AgentSettings, model: LoadedModel | None = None) -> FastAPI:
    """The agent's app; ``model`` is loaded in the lifespan unless the caller preloaded it."""
    metrics = AgentMetrics()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        loaded = model
        if loaded is None:
            trust = load_trust(settings.trust_keys)
            bundle = None
            if settings.follow:  # the bundle it served last, from disk (edge_agent.follower)
                from edge_agent.follower import remembered

                bundle = await asyncio.to_thread(remembered, settings, trust)
            if bundle is None:
                bundle = await asyncio.to_thread(resolve_bundle, settings.bundle,
                                                 settings.store, trust=trust)
            loaded = await asyncio.to_thread(load_model, bundle, settings)
        bundle = loaded.bundle
        host = ModelHost(settings, loaded, metrics)
        if host.trust is None:
            log.warning("bundles are not signature-checked: no --trust-key given; any bundle "
                        "whose files match its manifest is served")
        else:
            log.info("bundles must be signed by a trusted key",
                     extra={"trusted_keys": ",".join(host.trust.key_ids)})
        app.state.host = host
        app.state.serving = OpenAIServing(settings, host, metrics)
        registration = bridge = leaving = follower = None
        try:
            if settings.consul:
                from edge_agent.registration import ConsulRegistration

                registration = ConsulRegistration(settings, bundle)
                await registration.start()
            if settings.mqtt:
                from edge_agent.mqtt.bridge import MqttBridge

                bridge = MqttBridge(settings, app.state.serving)
                await bridge.start()

            async def swap_bundle(body: dict) -> ErrorResult | Bundle:
                result = await _swap(settings, host, body)
                if isinstance(result, Bundle) and registration is not None:
                    await registration.update(result)
                return result

            app.state.swap_bundle = swap_bundle
            if settings.follow and settings.consul:
                from edge_agent.follower import DesiredStateFollower
                from edge_agent.registration import ConsulKV

                async def registered(new: Bundle) -> None:
                    if registration is not None:
                        await registration.update(new)

                follower = DesiredStateFollower(settings, host, ConsulKV(settings), registered)
                await follower.start()
            leaving = asyncio.create_task(_leave_on_drain(host, registration, bridge))
            log.info("agent ready", extra={"bundle": bundle.name, "digest": bundle.digest12,
                                           "node": settings.node, "port": settings.port})
            yield
        finally:
            if follower is not None:
                await follower.stop()
            host.begin_drain()
            if leaving is not None:
                await leaving
            if not await host.wait_idle(settings.drain_timeout):
                log.warning("shutdown: requests still in flight after the drain timeout")
            if bridge is not None:
                await bridge.stop()
            if registration is not None:
                await registration.stop()
            await host.close()

    app = FastAPI(title="edgegen agent", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.settings = settings
    app.state.metrics = metrics
    app.include_router(router)
    app.include_router(identity.router)  # GET /edgegen/v1/identity (fleet key)
    app.openapi = lambda: openapi_schema(app)
    openai_http_errors(app)
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(NodeHeaders, node=settings.node, tier=settings.tier)
    return app


async def _swap(settings: AgentSettings, host: ModelHost, body: dict) -> ErrorResult | Bundle:
    """Hot swap to the bundle a request names: ``{"path": DIR}`` or ``{"url": URL}``."""
    source = body.get("path") or body.get("url") if isinstance(body, dict) else None
    if not isinstance(source, str) or not source:
        return error(400, "give the new bundle as {\"path\": DIR} or {\"url\": URL}",
                     param="path")
    if is_url(source):
        try:
            fetched = await asyncio.to_thread(resolve_bundle, source, settings.store,
                                              trust=host.trust)
        except AgentError as exc:
            return error(400, f"bundle refused: {exc}", param="url", code="bad_bundle")
        source = str(fetched.path)
    return await host.swap(source)


async def _leave_on_drain(host: ModelHost, registration, bridge) -> None:
    """The moment a drain begins (SIGTERM), stop attracting work: deregister from Consul (the
    router stops choosing this agent now, not when its check next fails) and leave the MQTT
    shared group. Requests already in flight still finish."""
    await host.draining.wait()
    if bridge is not None:
        await bridge.leave_shared()
    if registration is not None:
        await registration.stop()
