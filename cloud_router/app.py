"""The router's HTTP app: the agents' OpenAI API, forwarded (``cloud_router.proxy``, served
straight from the connection by ``cloud_router.front``); the table and its explanations;
health, readiness and metrics (FastAPI)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from cloud_router.affinity import prefix_keys
from cloud_router.auth import bearer_key_ok
from cloud_router.forwarding import Forwarder
from cloud_router.metrics import RouterMetrics
from cloud_router.openapi import openapi_schema
from cloud_router.protocol import error_body, model_card, model_list
from cloud_router.proxy import (
    FORWARDED_PATHS,
    ClientError,
    ForwardedPaths,
    hints_for,
    model_not_found,
    read_request,
)
from cloud_router.settings import RouterSettings
from cloud_router.stats import RetryBudget
from cloud_router.table import EndpointSource, EndpointTable

log = logging.getLogger(__name__)


def build_app(settings: RouterSettings, sources: Sequence[EndpointSource], *,
              ready: Callable[[], bool] | None = None,
              lifespan_tasks: Callable | None = None) -> ForwardedPaths:
    """The router app over ``sources`` (the discovery watchers, or fixed lists in tests).

    ``ready`` says whether discovery has loaded a table (default: always); ``lifespan_tasks``
    is an async context manager factory run for the app's life (the discovery watchers).
    The app's ``state`` holds its ``table``, ``forwarder`` and ``metrics``.
    """
    table = EndpointTable(sources, policy=settings.policy, ejection=settings.ejection,
                          budget=RetryBudget(ratio=settings.retry_budget_ratio))
    metrics = RouterMetrics(table.rows)
    forwarder = Forwarder(table, metrics, settings.forward)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        try:
            if lifespan_tasks is None:
                yield
            else:
                async with lifespan_tasks():
                    yield
        finally:
            await forwarder.aclose()

    app = FastAPI(title="edgegen router", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.table, app.state.forwarder, app.state.metrics = table, forwarder, metrics

    @app.exception_handler(ClientError)
    async def _client_error(_request: Request, exc: ClientError) -> JSONResponse:
        return JSONResponse(exc.body, exc.status)

    @app.exception_handler(RequestValidationError)
    async def _bad_params(_request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        param = str(first.get("loc", ["", ""])[-1]) or None
        return JSONResponse(error_body(400, f"{param}: {first.get('msg', 'invalid')}",
                                       code="invalid_parameter", param=param), 400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        """FastAPI's own errors (unknown route, wrong method) in OpenAI's shape, as the
        agent answers them."""
        if exc.status_code == 404:
            body = error_body(404, f"no route {request.method} {request.url.path}",
                              code="unknown_route")
        else:
            body = error_body(exc.status_code, str(exc.detail))
        return JSONResponse(body, exc.status_code, headers=getattr(exc, "headers", None))

    async def require_key(request: Request) -> None:
        if settings.api_keys and not bearer_key_ok(request.headers.get("authorization"),
                                                   settings.api_keys):
            raise ClientError(401, "a valid API key is required: send 'Authorization: Bearer "
                              "<key>'", "invalid_api_key")

    def known_model(model: str) -> None:
        if not table.known_model(model):
            raise model_not_found(model, table.fleet.known_models)

    @app.get("/v1/models", dependencies=[Depends(require_key)])
    async def models() -> dict:
        return model_list(table.models())

    @app.get("/v1/models/{model_id:path}", dependencies=[Depends(require_key)])
    async def retrieve_model(model_id: str) -> dict:
        """One entry of ``/v1/models``: a model some endpoint serves now, else a 404. Ids may
        hold slashes (``org/name``)."""
        served = table.models()
        if model_id not in served:
            raise model_not_found(model_id, served)
        return model_card(model_id)

    @app.get("/edgegen/v1/endpoints", dependencies=[Depends(require_key)])
    async def endpoints() -> dict:
        return {"endpoints": table.rows()}

    def explain(model: str, hints) -> dict:
        d = table.choose(hints, explain=True)
        return {
            "model": model,
            "hints": {"region": hints.region, "zone": hints.zone, "location": hints.location,
                      "prompt_prefixes": len(hints.prefix)},
            "endpoint": None if d.endpoint is None else {
                "id": d.endpoint.id, "node": d.endpoint.node, "tier": d.endpoint.tier,
                "url": d.endpoint.url, "region": d.endpoint.region},
            "reason": d.reason,
            "probe": d.probe,
            "candidates": [vars(r) for r in d.candidates],
            "skipped": d.skipped,
        }

    @app.get("/edgegen/v1/route", dependencies=[Depends(require_key)])
    async def route(model: str, region: str | None = None, zone: str | None = None,
                    location: str | None = None) -> dict:
        """Which endpoint a request with these hints would go to now, and why."""
        known_model(model)
        return explain(model, hints_for(settings, model, region, zone, location))

    @app.post("/edgegen/v1/route", dependencies=[Depends(require_key)])
    async def route_request(request: Request) -> dict:
        """Where this request (the body a client would POST, hints in its headers) would go
        now, and why: its prompt's cached prefixes and the endpoints' queues included."""
        payload, model = read_request(await request.body())
        known_model(model)
        path = "/v1/chat/completions" if "messages" in payload else "/v1/completions"
        h = request.headers
        return explain(model, hints_for(settings, model, h.get("x-edgegen-region"),
                                        h.get("x-edgegen-zone"), h.get("x-edgegen-location"),
                                        prefix_keys(path, payload)))

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        loaded = ready() if ready else True
        n = len(table.fleet.endpoints)
        ok = loaded and n > 0
        return JSONResponse({"ready": ok, "table_loaded": loaded, "endpoints": n},
                            200 if ok else 503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    app.openapi = lambda: openapi_schema(app, FORWARDED_PATHS)
    return ForwardedPaths(app, settings, table, forwarder, metrics, state=app.state)
