"""The router's HTTP app: the agents' OpenAI API, forwarded; the table and its explanations;
health, readiness and metrics. Only this module knows status codes and response headers:
choosing is the policy's job, sending the forwarder's, and their outcomes become HTTP here."""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager
from typing import Callable, Iterable, Sequence

import anyio
import httpx
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from cloud_router.auth import bearer_key_ok
from cloud_router.forwarding import Forwarded, Forwarder, Refused, UpstreamStream
from cloud_router.geo import parse_location
from cloud_router.metrics import RouterMetrics
from cloud_router.policy import RequestHints
from cloud_router.limits import BadBody, BodyLimit, decode_json
from cloud_router.openapi import openapi_schema
from cloud_router.protocol import error_body, model_card, model_list
from cloud_router.settings import RouterSettings
from cloud_router.stats import RetryBudget
from cloud_router.table import EndpointSource, EndpointTable

log = logging.getLogger(__name__)

FORWARDED_PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")
# Hop-by-hop and server headers of the upstream's answer, and the x-edgegen-* ones this
# router sets itself.
DROPPED_RESPONSE_HEADERS = {"connection", "keep-alive", "transfer-encoding", "content-length",
                            "date", "server", "x-edgegen-node", "x-edgegen-tier",
                            "x-edgegen-route"}
# edgegen_router_requests_total{tier="none", outcome} of the requests refused here.
REFUSED_OUTCOMES = {400: "bad_request", 401: "unauthorized", 404: "unknown_model",
                    408: "body_timeout", 413: "too_large"}


class ClientError(Exception):
    """A request the router refuses before forwarding (bad key, bad JSON, unknown model, bad
    hint)."""

    def __init__(self, status: int, message: str, code: str, param: str | None = None):
        super().__init__(message)
        self.status, self.body = status, error_body(status, message, code=code, param=param)


def build_app(settings: RouterSettings, sources: Sequence[EndpointSource], *,
              ready: Callable[[], bool] | None = None,
              transport: httpx.AsyncBaseTransport | None = None,
              lifespan_tasks: Callable | None = None) -> FastAPI:
    """The router app over ``sources`` (the discovery watchers, or fixed lists in tests).

    ``ready`` says whether discovery has loaded a table (default: always); ``lifespan_tasks``
    is an async context manager factory run for the app's life (the discovery watchers).
    """
    table = EndpointTable(sources, policy=settings.policy, ejection=settings.ejection,
                          budget=RetryBudget(ratio=settings.retry_budget_ratio))
    metrics = RouterMetrics(table.rows)
    forwarder = Forwarder(table, metrics, settings.forward, transport=transport)

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
    async def _client_error(request: Request, exc: ClientError) -> JSONResponse:
        if request.url.path in FORWARDED_PATHS:
            metrics.requests.labels("none", REFUSED_OUTCOMES[exc.status]).inc()
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

    def hints_for(model: str, region: str | None, zone: str | None,
                  location: str | None) -> RequestHints:
        loc = None
        if location:
            try:
                loc = parse_location(location)
            except ValueError as exc:
                raise ClientError(400, f"x-edgegen-location: {exc}", "invalid_location",
                                  "x-edgegen-location") from exc
        return RequestHints(model=model, region=region or settings.region, zone=zone or "",
                            location=loc)

    def model_not_found(model: str, known: Iterable[str]) -> ClientError:
        return ClientError(404, f"The model {model!r} does not exist or no endpoint serves "
                           f"it; known models: {', '.join(sorted(known)) or 'none'}",
                           "model_not_found", "model")

    def known_model(model: str) -> None:
        if not table.known_model(model):
            raise model_not_found(model, table.fleet.known_models)

    async def proxy(request: Request) -> Response:
        body = await request.body()  # bounded by limits.BodyLimit
        try:
            payload = decode_json(body)
        except BadBody as exc:
            raise ClientError(400, str(exc), exc.code, exc.param) from None
        if not isinstance(payload, dict) or not isinstance(payload.get("model"), str) \
                or not payload["model"]:
            raise ClientError(400, "the request body must be a JSON object with a 'model' "
                              "string", "missing_model", "model")
        known_model(payload["model"])
        h = request.headers
        hints = hints_for(payload["model"], h.get("x-edgegen-region"), h.get("x-edgegen-zone"),
                          h.get("x-edgegen-location"))
        return http_response(await forwarder.forward(request.url.path, body, dict(h), hints))

    for path in FORWARDED_PATHS:
        app.add_api_route(path, proxy, methods=["POST"], dependencies=[Depends(require_key)],
                          include_in_schema=False)

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

    @app.get("/edgegen/v1/route", dependencies=[Depends(require_key)])
    async def route(model: str, region: str | None = None, zone: str | None = None,
                    location: str | None = None) -> dict:
        """Which endpoint a request with these hints would go to now, and why."""
        known_model(model)
        hints = hints_for(model, region, zone, location)
        d = table.choose(hints)
        return {
            "model": model,
            "hints": {"region": hints.region, "zone": hints.zone, "location": hints.location},
            "endpoint": None if d.endpoint is None else {
                "id": d.endpoint.id, "node": d.endpoint.node, "tier": d.endpoint.tier,
                "url": d.endpoint.url, "region": d.endpoint.region},
            "reason": d.reason,
            "probe": d.probe,
            "candidates": [vars(r) for r in d.candidates],
            "skipped": d.skipped,
        }

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
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes,
                       on_refused=lambda status: metrics.requests.labels(
                           "none", REFUSED_OUTCOMES[status]).inc())
    return app


def http_response(outcome: Forwarded | Refused) -> Response:
    """The client's answer: a refusal is a 503 with Retry-After; an upstream's answer passes
    on as it is, with the x-edgegen-* headers saying where it went and why."""
    if isinstance(outcome, Refused):
        return JSONResponse(error_body(503, outcome.message, code="no_endpoint"), 503,
                            headers={"retry-after": str(outcome.retry_after_s),
                                     "x-edgegen-route": outcome.route})
    headers = {k: v for k, v in outcome.headers.items()
               if k.lower() not in DROPPED_RESPONSE_HEADERS}
    headers.update({"x-edgegen-node": outcome.endpoint.node,
                    "x-edgegen-tier": outcome.endpoint.tier, "x-edgegen-route": outcome.route})
    if outcome.stream is None:
        return Response(outcome.body, outcome.status, headers=headers)
    return _SSEPassthrough(outcome.stream, status_code=outcome.status, headers=headers)


class _SSEPassthrough(StreamingResponse):
    """Sends an upstream stream's events as they arrive, watches for the client leaving
    whatever the server's ASGI version, and always closes the stream (which releases the
    upstream, and so cancels its generation when the client left)."""

    def __init__(self, stream: UpstreamStream, **kw):
        super().__init__(stream.events(), **kw)
        self._stream = stream

    async def __call__(self, scope, receive, send) -> None:
        delivered = False

        async def stream(cancel: anyio.CancelScope) -> None:
            nonlocal delivered
            try:
                await self.stream_response(send)
                delivered = True
            except OSError:
                pass  # the client went away while we wrote to it
            cancel.cancel()

        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(stream, tg.cancel_scope)
                await self.listen_for_disconnect(receive)
                tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()
                await self._stream.close(delivered)
