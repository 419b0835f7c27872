"""The registry's HTTP layer: Consul's paths, parameters, headers and status codes.

Only this module knows HTTP. Errors are answered as Consul answers them: plain text, 400 for
a bad body or parameter, 404 for an unknown check or service, never a 500 for a client's
mistake.
"""

from __future__ import annotations

import json
import logging
import random
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from cloud_router.errors import InvalidRequest, NotFound, RegistryRequestError
from cloud_router.registry import queries, views
from cloud_router.registry.definitions import parse_duration
from cloud_router.registry.filtering import compile_filter
from cloud_router.registry.runtime import Registry

logger = logging.getLogger(__name__)

DEFAULT_WAIT = 300.0   # features/blocking.mdx: 5 minutes when not set
MAX_WAIT = 600.0       # ... and at most 10 minutes


def _blocking_params(request: Request) -> tuple[int, float]:
    q = request.query_params
    raw_index = q.get("index")
    index = 0
    if raw_index not in (None, ""):
        try:
            index = int(raw_index)
        except ValueError:
            raise InvalidRequest(f"Invalid index: {raw_index!r}") from None
        if index < 0:
            raise InvalidRequest(f"Invalid index: {raw_index!r}")
    raw_wait = q.get("wait")
    wait = DEFAULT_WAIT
    if raw_wait not in (None, ""):
        try:
            wait = parse_duration(raw_wait, "wait")
        except InvalidRequest:
            raise InvalidRequest(f"Invalid wait time: {raw_wait!r}") from None
        if wait <= 0:
            wait = DEFAULT_WAIT
    wait = min(wait, MAX_WAIT)
    return index, wait


def _flag(request: Request, name: str) -> bool:
    if name not in request.query_params:
        return False
    value = request.query_params[name].lower()
    if value in ("", "1", "true", "t", "yes"):
        return True
    if value in ("0", "false", "f", "no"):
        return False
    raise InvalidRequest(f"Invalid value for ?{name}: {value!r}")


async def _json_body(request: Request) -> object:
    raw = await request.body()
    if not raw.strip():
        return None
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidRequest(f"Request decode failed: {exc}") from exc


def create_app(registry: Registry) -> FastAPI:
    """The Consul-compatible HTTP API over ``registry``."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await registry.start()
        try:
            yield
        finally:
            await registry.stop()

    app = FastAPI(title="edgegen registry (Consul-compatible)", lifespan=lifespan,
                  docs_url=None, redoc_url=None, openapi_url=None)
    state = registry.state

    def indexed(body: object) -> JSONResponse:
        return JSONResponse(body, headers={
            "X-Consul-Index": str(max(state.index, 1)),
            "X-Consul-KnownLeader": "true",
            "X-Consul-LastContact": "0",
        })

    async def block(request: Request) -> None:
        index, wait = _blocking_params(request)
        if index > 0:
            # features/blocking.mdx: up to wait/16 of jitter spreads concurrent wake-ups.
            await registry.wait_past(index, wait + random.uniform(0, wait / 16))

    @app.exception_handler(RegistryRequestError)
    async def _request_error(request: Request, exc: RegistryRequestError):
        return PlainTextResponse(str(exc), status_code=exc.status_code)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 405:
            return PlainTextResponse(f"method {request.method} not allowed", status_code=405)
        return PlainTextResponse(f"{exc.status_code} page not found"
                                 if exc.status_code == 404 else str(exc.detail),
                                 status_code=exc.status_code)

    # ---- agent ---------------------------------------------------------------------------

    @app.put("/v1/agent/service/register")
    async def register(request: Request):
        body = await _json_body(request)
        registry.register(body)
        return Response(status_code=200)

    @app.put("/v1/agent/service/deregister/{service_id:path}")
    async def deregister(service_id: str):
        registry.deregister(service_id)
        return Response(status_code=200)

    async def ttl(check_id: str, status: str, note: str) -> Response:
        registry.update_ttl(check_id, status, note)
        return Response(status_code=200)

    @app.put("/v1/agent/check/pass/{check_id:path}")
    async def check_pass(check_id: str, request: Request):
        return await ttl(check_id, "passing", request.query_params.get("note", ""))

    @app.put("/v1/agent/check/warn/{check_id:path}")
    async def check_warn(check_id: str, request: Request):
        return await ttl(check_id, "warning", request.query_params.get("note", ""))

    @app.put("/v1/agent/check/fail/{check_id:path}")
    async def check_fail(check_id: str, request: Request):
        return await ttl(check_id, "critical", request.query_params.get("note", ""))

    @app.put("/v1/agent/check/update/{check_id:path}")
    async def check_update(check_id: str, request: Request):
        body = await _json_body(request)
        if not isinstance(body, dict):
            raise InvalidRequest("Request decode failed: the body must be a JSON object")
        norm = {k.lower(): v for k, v in body.items()}
        status, output = norm.get("status"), norm.get("output", "")
        if not isinstance(status, str) or not isinstance(output, str):
            raise InvalidRequest("Request decode failed: Status and Output must be strings")
        return await ttl(check_id, status, output)

    @app.get("/v1/agent/services")
    async def agent_services(request: Request):
        return JSONResponse(queries.agent_services(
            state, compile_filter(request.query_params.get("filter"))))

    @app.get("/v1/agent/checks")
    async def agent_checks():
        return JSONResponse({cid: views.check_json(state, c)
                             for cid, c in sorted(state.checks.items())})

    @app.get("/v1/agent/service/{service_id:path}")
    async def agent_service(service_id: str, request: Request):
        def current():
            s = state.services.get(service_id)
            if s is None:
                raise NotFound(f"unknown service ID: {service_id}")
            return views.agent_service_with_hash(state, s)

        body, digest = current()
        wanted = request.query_params.get("hash")
        if wanted and wanted == digest:   # hash-based blocking (features/blocking.mdx)
            _, wait = _blocking_params(request)
            await registry.wait_past(state.index, wait)
            body, digest = current()
        return JSONResponse(body, headers={"X-Consul-ContentHash": digest})

    # ---- health, catalog, coordinates, status ---------------------------------------------

    @app.get("/v1/health/service/{name:path}")
    async def health_service(name: str, request: Request):
        predicate = compile_filter(request.query_params.get("filter"))
        passing = _flag(request, "passing")
        await block(request)
        return indexed(queries.health_service(
            state, name, passing=passing, near=request.query_params.get("near"),
            predicate=predicate))

    @app.get("/v1/health/checks/{name:path}")
    async def health_checks(name: str, request: Request):
        await block(request)
        return indexed([views.check_json(state, c)
                        for s in state.instances(name)
                        for c in state.service_checks(s.definition.id)])

    @app.get("/v1/catalog/services")
    async def catalog_services(request: Request):
        await block(request)
        return indexed(views.catalog_services(state))

    @app.get("/v1/catalog/service/{name:path}")
    async def catalog_service(name: str, request: Request):
        predicate = compile_filter(request.query_params.get("filter"))
        await block(request)
        return indexed(queries.catalog_service(
            state, name, near=request.query_params.get("near"), predicate=predicate))

    @app.get("/v1/coordinate/nodes")
    async def coordinate_nodes(request: Request):
        await block(request)
        return indexed(queries.coordinate_nodes(state))

    @app.get("/v1/status/leader")
    async def status_leader(request: Request):
        return JSONResponse(f"{request.url.hostname}:8300")

    @app.get("/v1/status/peers")
    async def status_peers(request: Request):
        return JSONResponse([f"{request.url.hostname}:8300"])

    return app


def serve(host: str = "127.0.0.1", port: int = 8500, data_dir: str | None = None, *,
          min_deregister_after: float = 60.0) -> None:
    """Run the registry until SIGINT/SIGTERM (what `edgegen registry` calls)."""
    import uvicorn

    registry = Registry(data_dir, min_deregister_after=min_deregister_after)
    logger.info("registry starting", extra={"host": host, "port": port, "data_dir": data_dir})
    uvicorn.run(create_app(registry), host=host, port=port, log_config=None,
                timeout_graceful_shutdown=2)
