"""The registry's HTTP layer: Consul's paths, parameters, headers and status codes.

Only this module knows HTTP. Errors are answered as Consul answers them: plain text, 400 for
a bad body or parameter, 404 for an unknown check or service, never a 500 for a client's
mistake.

With an ACL config (``--acl-file``) every request is checked as Consul checks it (``acl``):
writes need ``service:write`` on the service they create or touch (403 with Consul's text
otherwise), reads drop what the token may not read and then say so with
``X-Consul-Results-Filtered-By-ACLs: true`` (only to a request that presented a token, as
Consul does), ``/v1/status/*`` needs nothing. Tokens are hidden in the access log.

``/v1/kv/<key>`` is Consul's KV store (rules and indexes in ``kv``): reading a key needs
``key:read`` (403 otherwise), ``recurse`` and ``keys`` listings drop the keys the token may not
read, a write or delete needs ``key:write`` on the key, ``?recurse`` deletes need it on the
whole prefix.
"""

from __future__ import annotations

import json
import logging
import random
import re
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from cloud_router.errors import (
    AclNotFound,
    InvalidRequest,
    NotFound,
    PermissionDenied,
    RegistryRequestError,
)
from cloud_router.registry import kv, params, queries, views
from cloud_router.registry.acl import (
    Access,
    AclConfig,
    access_for,
    load_acl_file,
    request_token,
)
from cloud_router.registry.definitions import parse_service
from cloud_router.registry.filtering import compile_filter
from cloud_router.registry.runtime import Registry

logger = logging.getLogger(__name__)

async def _json_body(request: Request) -> object:
    raw = await request.body()
    if not raw.strip():
        return None
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidRequest(f"Request decode failed: {exc}") from exc


async def _kv_value(request: Request) -> bytes:
    """A KV write's body, refused with 413 once past Consul's limit (also when no
    Content-Length announced it)."""
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        kv.check_size(len(body))
    return bytes(body)


def _keep(items: list, readable) -> tuple[list, bool]:
    """The items ``readable`` accepts, and whether any was dropped."""
    kept = [i for i in items if readable(i)]
    return kept, len(kept) != len(items)


def create_app(registry: Registry, acl: AclConfig | None = None) -> FastAPI:
    """The Consul-compatible HTTP API over ``registry``; ``acl`` turns Consul's ACLs on."""

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

    def meta(index: int) -> dict[str, str]:
        return {"X-Consul-Index": str(max(index, 1)), "X-Consul-KnownLeader": "true",
                "X-Consul-LastContact": "0"}

    def indexed(body: object, access: Access | None = None,
                filtered: bool = False) -> JSONResponse:
        return JSONResponse(body, headers={**meta(state.index),
                                           **filtered_header(access, filtered)})

    def filtered_header(access: Access | None, filtered: bool) -> dict[str, str]:
        # Consul tells only a request that presented a token that results were dropped
        # (Server.maskResultsFilteredByACLs), so anonymous callers learn nothing.
        if access is not None and access.presented and filtered:
            return {"X-Consul-Results-Filtered-By-ACLs": "true"}
        return {}

    def access(request: Request) -> Access:
        """The request's token under the ACL config (403 ACL not found when unknown)."""
        return access_for(acl, request_token(request.query_params, request.headers))

    def can_read_entry(a: Access, node: str, service: str) -> bool:
        """Health and catalog entries: Consul needs node:read and service:read."""
        return a.allows("node", node, "read") and a.allows("service", service, "read")

    def can_read_check(a: Access, check: dict) -> bool:
        if check.get("ServiceName"):
            return can_read_entry(a, check["Node"], check["ServiceName"])
        return a.allows("node", check["Node"], "read")

    def require_service_write(a: Access, service_id: str) -> None:
        """Writes to an existing service need service:write on its name (so one agent's
        token cannot touch another's service); unknown IDs are left to the registry."""
        existing = state.services.get(service_id)
        if existing is not None:
            a.require("service", existing.definition.name, "write")

    async def block(request: Request, index_of=lambda: state.index) -> None:
        """Hold a blocking query until ``index_of()`` (the index the query answers with)
        passes ``?index``, or ``?wait`` runs out."""
        index, wait = params.blocking(request.query_params)
        if index > 0:
            # features/blocking.mdx: up to wait/16 of jitter spreads concurrent wake-ups.
            await registry.wait_until(lambda: index_of() > index,
                                      wait + random.uniform(0, wait / 16))

    @app.exception_handler(RegistryRequestError)
    async def _request_error(request: Request, exc: RegistryRequestError):
        if isinstance(exc, PermissionDenied):
            logger.warning("acl: permission denied", extra={
                "accessor": exc.accessor, "permission": exc.permission,
                "resource": exc.resource, "method": request.method, "path": request.url.path,
                "client": request.client.host if request.client else ""})
        elif isinstance(exc, AclNotFound):
            logger.warning("acl: unknown token", extra={
                "method": request.method, "path": request.url.path,
                "client": request.client.host if request.client else ""})
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
        a = access(request)
        if acl is not None:
            # Consul's vetServiceRegister: write on the new name, and on the name of the
            # service this registration would overwrite.
            definition = parse_service(body)
            a.require("service", definition.name, "write")
            require_service_write(a, definition.id)
        registry.register(body)
        return Response(status_code=200)

    @app.put("/v1/agent/service/deregister/{service_id:path}")
    async def deregister(service_id: str, request: Request):
        require_service_write(access(request), service_id)
        registry.deregister(service_id)
        return Response(status_code=200)

    async def ttl(request: Request, check_id: str, status: str, note: str) -> Response:
        a = access(request)
        check = state.checks.get(check_id)
        if check is not None:   # an unknown check is the registry's 404
            if check.definition.service_id in state.services:
                require_service_write(a, check.definition.service_id)
            else:
                a.require("node", state.node, "write")
        registry.update_ttl(check_id, status, note)
        return Response(status_code=200)

    @app.put("/v1/agent/check/pass/{check_id:path}")
    async def check_pass(check_id: str, request: Request):
        return await ttl(request, check_id, "passing", request.query_params.get("note", ""))

    @app.put("/v1/agent/check/warn/{check_id:path}")
    async def check_warn(check_id: str, request: Request):
        return await ttl(request, check_id, "warning", request.query_params.get("note", ""))

    @app.put("/v1/agent/check/fail/{check_id:path}")
    async def check_fail(check_id: str, request: Request):
        return await ttl(request, check_id, "critical", request.query_params.get("note", ""))

    @app.put("/v1/agent/check/update/{check_id:path}")
    async def check_update(check_id: str, request: Request):
        body = await _json_body(request)
        if not isinstance(body, dict):
            raise InvalidRequest("Request decode failed: the body must be a JSON object")
        norm = {k.lower(): v for k, v in body.items()}
        status, output = norm.get("status"), norm.get("output", "")
        if not isinstance(status, str) or not isinstance(output, str):
            raise InvalidRequest("Request decode failed: Status and Output must be strings")
        return await ttl(request, check_id, status, output)

    @app.get("/v1/agent/services")
    async def agent_services(request: Request):
        a = access(request)
        services = queries.agent_services(state, compile_filter(request.query_params.get("filter")))
        kept, dropped = _keep(list(services.items()),
                              lambda item: a.allows("service", item[1]["Service"], "read"))
        return JSONResponse(dict(kept), headers=filtered_header(a, dropped))

    @app.get("/v1/agent/checks")
    async def agent_checks(request: Request):
        a = access(request)
        checks = [(cid, views.check_json(state, c)) for cid, c in sorted(state.checks.items())]
        kept, dropped = _keep(checks, lambda item: can_read_check(a, item[1]))
        return JSONResponse(dict(kept), headers=filtered_header(a, dropped))

    @app.get("/v1/agent/service/{service_id:path}")
    async def agent_service(service_id: str, request: Request):
        a = access(request)

        def current():
            s = state.services.get(service_id)
            if s is None:
                raise NotFound(f"unknown service ID: {service_id}")
            a.require("service", s.definition.name, "read")
            return views.agent_service_with_hash(state, s)

        body, digest = current()
        wanted = request.query_params.get("hash")
        if wanted and wanted == digest:   # hash-based blocking (features/blocking.mdx)
            _, wait = params.blocking(request.query_params)
            await registry.wait_past(state.index, wait)
            body, digest = current()
        return JSONResponse(body, headers={"X-Consul-ContentHash": digest})

    # ---- health, catalog, coordinates, status ---------------------------------------------

    @app.get("/v1/health/service/{name:path}")
    async def health_service(name: str, request: Request):
        a = access(request)
        predicate = compile_filter(request.query_params.get("filter"))
        passing = params.flag(request.query_params, "passing")
        await block(request)
        entries = queries.health_service(
            state, name, passing=passing, near=request.query_params.get("near"),
            predicate=predicate)
        kept, dropped = _keep(entries, lambda e: can_read_entry(
            a, e["Node"]["Node"], e["Service"]["Service"]))
        return indexed(kept, a, dropped)

    @app.get("/v1/health/checks/{name:path}")
    async def health_checks(name: str, request: Request):
        a = access(request)
        await block(request)
        checks = [views.check_json(state, c)
                  for s in state.instances(name)
                  for c in state.service_checks(s.definition.id)]
        kept, dropped = _keep(checks, lambda c: can_read_check(a, c))
        return indexed(kept, a, dropped)

    @app.get("/v1/catalog/services")
    async def catalog_services(request: Request):
        a = access(request)
        await block(request)
        services = list(views.catalog_services(state).items())
        kept, dropped = _keep(services, lambda item: a.allows("service", item[0], "read"))
        return indexed(dict(kept), a, dropped)

    @app.get("/v1/catalog/service/{name:path}")
    async def catalog_service(name: str, request: Request):
        a = access(request)
        predicate = compile_filter(request.query_params.get("filter"))
        await block(request)
        entries = queries.catalog_service(
            state, name, near=request.query_params.get("near"), predicate=predicate)
        kept, dropped = _keep(entries, lambda e: can_read_entry(a, e["Node"], e["ServiceName"]))
        return indexed(kept, a, dropped)

    @app.get("/v1/coordinate/nodes")
    async def coordinate_nodes(request: Request):
        a = access(request)
        await block(request)
        kept, dropped = _keep(queries.coordinate_nodes(state),
                              lambda c: a.allows("node", c["Node"], "read"))
        return indexed(kept, a, dropped)

    # ---- KV store ------------------------------------------------------------------------

    @app.get("/v1/kv/{key:path}")
    async def kv_get(key: str, request: Request):
        opts = kv.read_options(key, request.query_params)
        a = access(request)
        if not opts.listing:
            a.require("key", key, "read")
        index_of = state.kv.list_index if opts.listing else lambda: state.kv.key_index(key)
        await block(request, index_of)
        found = state.kv.under(key) if opts.listing else \
            [e for e in (state.kv.get(key),) if e is not None]
        kept, dropped = _keep(found, lambda e: a.allows("key", e.key, "read"))
        headers = {**meta(index_of()), **filtered_header(a, dropped)}
        if opts.keys:
            names = kv.key_names(kept, key, opts.separator)
            if names or not key:   # Consul answers the root with [] rather than a 404
                return JSONResponse(names, headers=headers)
        elif kept and opts.raw and not opts.recurse:
            return Response(kept[0].value or b"", headers={**headers, **kv.RAW_HEADERS})
        elif kept:
            return JSONResponse([kv.entry_json(e) for e in kept], headers=headers)
        return Response(status_code=404, headers=headers)

    @app.put("/v1/kv/{key:path}")
    async def kv_put(key: str, request: Request):
        flags, cas = kv.write_options(key, request.query_params)
        announced = request.headers.get("content-length", "")
        kv.check_size(int(announced) if announced.isdigit() else 0)   # 413 before reading
        access(request).require("key", key, "write")
        value = await _kv_value(request)
        return JSONResponse(registry.kv_put(key, value or None, flags, cas))

    @app.delete("/v1/kv/{key:path}")
    async def kv_delete(key: str, request: Request):
        recurse, cas = kv.delete_options(key, request.query_params)
        a = access(request)
        if recurse:
            a.require_prefix_write("key", key)
        else:
            a.require("key", key, "write")
        return JSONResponse(registry.kv_delete(key, recurse=recurse, cas=cas))

    # /v1/status/* needs no token, as in Consul (acl-rules.mdx: not covered by ACL policies).
    @app.get("/v1/status/leader")
    async def status_leader(request: Request):
        return JSONResponse(f"{request.url.hostname}:8300")

    @app.get("/v1/status/peers")
    async def status_peers(request: Request):
        return JSONResponse([f"{request.url.hostname}:8300"])

    return app


class HideTokens(logging.Filter):
    """Replace the value of ``?token=`` in access-log lines with ``<hidden>``, as Consul
    does in its request logs: a token in a URL must not reach a log file."""

    _TOKEN = re.compile(r"([?&]token=)[^&\s]*")

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(self._TOKEN.sub(r"\1<hidden>", a) if isinstance(a, str) else a
                                for a in record.args)
        if isinstance(record.msg, str):
            record.msg = self._TOKEN.sub(r"\1<hidden>", record.msg)
        return True


def serve(host: str = "127.0.0.1", port: int = 8500, data_dir: str | None = None, *,
          min_deregister_after: float = 60.0, acl_file: str | None = None) -> None:
    """Run the registry until SIGINT/SIGTERM (what `edgegen registry` calls). With
    ``acl_file``, Consul's ACLs are on (ConfigError at once when the file cannot work)."""
    import uvicorn

    acl = load_acl_file(acl_file) if acl_file else None
    registry = Registry(data_dir, min_deregister_after=min_deregister_after)
    logging.getLogger("uvicorn.access").addFilter(HideTokens())
    logger.info("registry starting", extra={
        "host": host, "port": port, "data_dir": data_dir, "acl": acl is not None,
        "default_policy": acl.default_policy if acl else None,
        "tokens": len(acl.by_secret) if acl else 0})
    uvicorn.run(create_app(registry, acl), host=host, port=port, log_config=None,
                timeout_graceful_shutdown=2)
