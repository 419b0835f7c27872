"""The agent's OpenAPI document, with the body of every request and response.

The routes read their JSON themselves (``serving`` validates it and answers in OpenAI's error
shape), so FastAPI cannot infer their bodies; this table says what each route takes and
answers, from the models in ``serving.protocol``, for schema-driven clients, fuzzers and
client generators.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from edge_agent.serving.protocol import (
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    EmbeddingRequest,
    EmbeddingResponse,
    ErrorResponse,
    ModelCard,
    ModelList,
)


class BundleInfo(BaseModel):
    name: str
    digest: str
    digest12: str
    precision: str
    task: str
    runtime: str
    context_length: int
    path: str


class BundleSwap(BaseModel):
    """Give exactly one: a bundle directory on the agent's disk, or a URL to fetch it from."""

    path: str | None = None
    url: str | None = None


class Status(BaseModel):
    status: str


class PrefixCacheReset(BaseModel):
    reset: bool  # False: this model has no prefix cache (embeddings, GPUs, size 0)


GENERATION_ERRORS = (400, 404, 408, 413, 429, 500)
# path → (method, request model, 200 model, 200 stream chunk model, error statuses)
ROUTES: dict[str, tuple[str, type[BaseModel] | None, type[BaseModel] | None,
                        type[BaseModel] | None, tuple[int, ...]]] = {
    "/v1/chat/completions": ("post", ChatCompletionRequest, ChatCompletionResponse,
                             ChatCompletionChunk, GENERATION_ERRORS),
    "/v1/completions": ("post", CompletionRequest, CompletionResponse, CompletionResponse,
                        GENERATION_ERRORS),
    "/v1/embeddings": ("post", EmbeddingRequest, EmbeddingResponse, None, GENERATION_ERRORS),
    "/v1/models": ("get", None, ModelList, None, ()),
    "/v1/models/{model_id}": ("get", None, ModelCard, None, (404,)),
    "/healthz": ("get", None, Status, None, ()),
    "/readyz": ("get", None, Status, None, ()),
    "/edgegen/v1/bundle": ("get", None, BundleInfo, None, ()),
}
SWAP_ERRORS = (400, 401, 403, 408, 413)
ADMIN_ERRORS = (401, 403)


def _ref(model: type[BaseModel]) -> dict:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def _json(model: type[BaseModel]) -> dict:
    return {"application/json": {"schema": _ref(model)}}


def openapi_schema(app: FastAPI) -> dict[str, Any]:
    """FastAPI's document for ``app``, with the bodies of the table above filled in."""
    if app.openapi_schema:
        return app.openapi_schema
    doc = get_openapi(title=app.title, version=app.version, routes=app.routes)
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    models = {ErrorResponse, BundleInfo, BundleSwap, PrefixCacheReset}
    for path, (method, request, response, chunk, errors) in ROUTES.items():
        op = doc["paths"][path][method]
        if request is not None:
            op["requestBody"] = {"required": True, "content": _json(request)}
            models.add(request)
        content = _json(response) if response is not None else {}
        if chunk is not None:
            content["text/event-stream"] = {"schema": {
                "type": "string", "description": f"Server-sent events, each `data: <{chunk.__name__}>`, "
                "then `data: [DONE]` (when the request has `stream: true`)"}}
            models.add(chunk)
        op["responses"] = {"200": {"description": "OK", "content": content}}
        op["responses"].update({str(s): {"description": "Error", "content": _json(ErrorResponse)}
                                for s in errors})
        models.update(m for m in (response,) if m is not None)
    doc["paths"]["/readyz"]["get"]["responses"]["503"] = {
        "description": "Not ready: draining, or the queue is full", "content": _json(Status)}
    swap = doc["paths"]["/edgegen/v1/bundle"]["post"]
    swap["requestBody"] = {"required": True, "content": _json(BundleSwap)}
    swap["responses"] = {"200": {"description": "Swapped", "content": _json(BundleInfo)}}
    swap["responses"].update({str(s): {"description": "Error", "content": _json(ErrorResponse)}
                              for s in SWAP_ERRORS})
    swap["security"] = [{"bearer": []}]
    reset = doc["paths"]["/edgegen/v1/prefix-cache/reset"]["post"]
    reset["requestBody"] = {"required": False, "content": {"application/json": {"schema": {
        "type": "object", "description": "No fields; the body is not read"}}}}
    reset["responses"] = {"200": {"description": "Forgotten before the cache's next use",
                                  "content": _json(PrefixCacheReset)}}
    reset["responses"].update({str(s): {"description": "Error", "content": _json(ErrorResponse)}
                               for s in ADMIN_ERRORS})
    reset["security"] = [{"bearer": []}]
    doc["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    for model in models:  # the fields each model has (a delta's None fields are left out)
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(schema.pop("$defs", {}))
        schemas[model.__name__] = schema
    app.openapi_schema = doc
    return doc
