"""The HTTP face of the agent: maps serving's results to JSON responses and SSE streams.

Only this package knows about status codes and HTTP framing; the logic is in
``edge_agent.serving``. Errors FastAPI raises itself (an unknown route, a wrong method) are
answered in OpenAI's error shape too (``openai_http_errors``).
"""

from __future__ import annotations

import hmac
import json
import logging
from collections.abc import AsyncIterator

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from edge_agent.serving.api import RESUME_HEADER, OpenAIServing
from edge_agent.serving.generation import ChunkStream
from edge_agent.serving.bodies import decode_json
from edge_agent.serving.protocol import ErrorResult, error

log = logging.getLogger(__name__)
router = APIRouter()
LOAD_FORMAT_HEADER = "endpoint-load-metrics-format"   # ORCA: the format a client asks for
LOAD_HEADER = "endpoint-load-metrics"                 # ORCA: the load report


def _serving(request: Request) -> OpenAIServing:
    return request.app.state.serving


def openai_http_errors(app: FastAPI) -> None:
    """Answer the HTTP errors FastAPI raises itself (404 unknown route, 405 wrong method) in
    OpenAI's error shape instead of FastAPI's ``{"detail": ...}``."""

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code == 404:
            message = f"no route {request.method} {request.url.path}"
        else:
            message = str(exc.detail)
        body = error(exc.status_code, message, code="unknown_route" if exc.status_code == 404
                     else None)
        return JSONResponse(body.body, status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))


async def _body(request: Request) -> dict | ErrorResult:
    """The JSON body (its size already bounded by ``limits.BodyLimit``), or a 400."""
    return decode_json(await request.body())


def _error_response(err: ErrorResult) -> JSONResponse:
    return JSONResponse(err.body, status_code=err.status, headers=err.headers)


async def _sse(chunks: ChunkStream) -> AsyncIterator[bytes]:
    """One SSE event per chunk; events that are already waiting go out in one write (the
    scheduler hands a stream its tokens every ``stream_interval_ms``), so the client wakes
    up once per batch of tokens, not once per token."""
    pending: list[bytes] = []
    try:
        async for chunk in chunks:
            pending.append(b"data: " + json.dumps(chunk, separators=(",", ":")).encode() + b"\n\n")
            if not chunks.ready():
                yield b"".join(pending)
                pending.clear()
        pending.append(b"data: [DONE]\n\n")
        yield b"".join(pending)
    finally:
        await chunks.aclose()  # client gone or done: cancel the generation, free the slot


def _respond(result, headers: dict[str, str] | None = None) -> Response:
    if isinstance(result, ErrorResult):
        response = _error_response(result)
        response.headers.update(headers or {})
        return response
    if isinstance(result, dict):
        return JSONResponse(result, headers=headers)
    return StreamingResponse(_sse(result), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no",
                                      **(headers or {})})


def _load_report(request: Request) -> dict[str, str]:
    """ORCA's per-request load report (Envoy's, and vLLM's for the Gateway API Inference
    Extension), when the request asks for it in the TEXT format: how the router learns each
    agent's queue without polling."""
    if request.headers.get(LOAD_FORMAT_HEADER, "").strip().upper() != "TEXT":
        return {}
    load = _serving(request).host.load()
    return {LOAD_HEADER: f"TEXT named_metrics.num_requests_waiting={load.waiting}, "
                         f"named_metrics.num_requests_running={load.running}, "
                         f"named_metrics.kv_cache_usage_perc={load.cache_usage:.4f}"}


async def _serve(request: Request, method: str, **options) -> Response:
    """Parse the JSON body and hand it to ``serving.<method>``; map the result to HTTP."""
    body = await _body(request)
    if isinstance(body, ErrorResult):
        return _error_response(body)
    result = await getattr(_serving(request), method)(body, **options)
    return _respond(result, _load_report(request))


@router.post("/v1/chat/completions")
async def chat_completions(request: Request) -> Response:
    return await _serve(request, "create_chat_completion",
                        resume=request.headers.get(RESUME_HEADER) == "1")


@router.post("/v1/completions")
async def completions(request: Request) -> Response:
    return await _serve(request, "create_completion")


@router.post("/v1/embeddings")
async def embeddings(request: Request) -> Response:
    return await _serve(request, "create_embedding")


@router.get("/v1/models")
async def models(request: Request) -> Response:
    return JSONResponse(_serving(request).models.list_models())


@router.get("/v1/models/{model_id:path}")
async def retrieve_model(request: Request, model_id: str) -> Response:
    """The served model's entry of ``/v1/models``, else a 404. Ids may hold slashes
    (``org/name``; OpenAI's client sends ``org%2Fname``, decoded before routing)."""
    return _respond(_serving(request).models.retrieve_model(model_id))


@router.get("/healthz")
async def healthz() -> Response:
    return JSONResponse({"status": "ok"})


@router.get("/readyz")
async def readyz(request: Request) -> Response:
    ok, reason = _serving(request).host.ready()
    return JSONResponse({"status": reason}, status_code=200 if ok else 503)


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    m = request.app.state.metrics
    return Response(m.render(), media_type=m.content_type)


@router.get("/edgegen/v1/bundle")
async def get_bundle(request: Request) -> Response:
    return JSONResponse(_serving(request).models.bundle_info())


def _admin_refusal(request: Request, what: str) -> Response | None:
    """403 when the agent has no admin token, 401 for a wrong bearer; None: go ahead."""
    settings = request.app.state.settings
    if not settings.admin_token:
        return _error_response(error(403, f"{what} are disabled (no --admin-token)"))
    given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
    if not hmac.compare_digest(given.encode(), settings.admin_token.encode()):
        return _error_response(error(401, "a valid admin bearer token is required"))
    return None


@router.post("/edgegen/v1/prefix-cache/reset")
async def reset_prefix_cache(request: Request) -> Response:
    """Forget the prefix cache (vLLM's ``/reset_prefix_cache``); bearer admin token required.
    Requests running keep the KV they hold: only later lookups start empty."""
    refused = _admin_refusal(request, "cache resets")
    if refused is not None:
        return refused
    cache = _serving(request).models.prefix_cache()
    if cache is not None:
        cache.request_reset()
    return JSONResponse({"reset": cache is not None})


@router.post("/edgegen/v1/bundle")
async def post_bundle(request: Request) -> Response:
    """Hot swap: body ``{"path": DIR}`` or ``{"url": URL}``; bearer admin token required."""
    refused = _admin_refusal(request, "bundle swaps")
    if refused is not None:
        return refused
    body = await _body(request)
    if isinstance(body, ErrorResult):
        return _error_response(body)
    result = await request.app.state.swap_bundle(body)
    if isinstance(result, ErrorResult):
        return _error_response(result)
    return JSONResponse(_serving(request).models.bundle_info())
