"""The router's OpenAPI document: the bodies of the OpenAI routes it forwards, and of its own.

The forwarded bodies are the agents' contract (the agent's own ``/openapi.json`` has every
field); the router reads only ``model`` and the ``x-edgegen-*`` hint headers, and passes the
rest through unchanged, so the document says exactly that.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel, ConfigDict


class ForwardedRequest(BaseModel):
    """An OpenAI request (chat, completion or embedding): forwarded as it is to an agent."""

    model_config = ConfigDict(extra="allow")
    model: str


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


class AgentAnswer(BaseModel):
    """The agent's answer, passed through (OpenAI's response object, or SSE when streaming)."""

    model_config = ConfigDict(extra="allow")


class ModelCard(BaseModel):
    id: str
    object: str = "model"
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: str = "list"
    data: list[ModelCard]


class EndpointTable(BaseModel):
    endpoints: list[dict[str, Any]]


class RouteExplanation(BaseModel):
    model: str
    hints: dict[str, Any]
    endpoint: dict[str, Any] | None
    reason: str
    probe: bool
    candidates: list[dict[str, Any]]
    skipped: dict[str, str]   # endpoint id -> why it is not a candidate


class Readiness(BaseModel):
    ready: bool
    table_loaded: bool
    endpoints: int


class Status(BaseModel):
    status: str


FORWARDED_ERRORS = (400, 401, 404, 408, 413, 429, 500, 503)
OWN = {"/v1/models": (ModelList, (401,)), "/v1/models/{model_id}": (ModelCard, (401, 404)),
       "/edgegen/v1/endpoints": (EndpointTable, (401,)),
       "/edgegen/v1/route": (RouteExplanation, (400, 401, 404)), "/healthz": (Status, ()),
       "/readyz": (Readiness, ())}


def _json(model: type[BaseModel]) -> dict:
    return {"application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}


def openapi_schema(app: FastAPI, forwarded_paths: tuple[str, ...]) -> dict[str, Any]:
    if app.openapi_schema:
        return app.openapi_schema
    doc = get_openapi(title=app.title, version=app.version, routes=app.routes)
    models = {ForwardedRequest, ErrorResponse, AgentAnswer, *(m for m, _ in OWN.values())}
    errors = {str(s): {"description": "Error", "content": _json(ErrorResponse)}
              for s in FORWARDED_ERRORS}
    hint_headers = [{"name": h, "in": "header", "required": False,
                     "schema": {"type": "string"}} for h in
                    ("x-edgegen-region", "x-edgegen-zone", "x-edgegen-location")]
    for path in forwarded_paths:
        doc["paths"][path] = {"post": {
            "summary": f"Forwarded to the nearest healthy agent: {path}",
            "parameters": hint_headers,
            "requestBody": {"required": True, "content": _json(ForwardedRequest)},
            "responses": {"200": {"description": "The agent's answer", "content": {
                **_json(AgentAnswer), "text/event-stream": {"schema": {"type": "string"}}}},
                **errors}}}
    for path, (model, statuses) in OWN.items():
        op = doc["paths"][path]["get"]
        op["responses"]["200"] = {"description": "OK", "content": _json(model)}
        op["responses"].update({str(s): {"description": "Error",
                                         "content": _json(ErrorResponse)} for s in statuses})
    # the same explanation for a whole request: its body, hints in its headers
    doc["paths"]["/edgegen/v1/route"]["post"] = {
        **doc["paths"]["/edgegen/v1/route"]["post"], "parameters": hint_headers,
        "requestBody": {"required": True, "content": _json(ForwardedRequest)},
        "responses": {"200": {"description": "OK", "content": _json(RouteExplanation)},
                      **{str(s): {"description": "Error", "content": _json(ErrorResponse)}
                         for s in OWN["/edgegen/v1/route"][1]}}}
    doc["paths"]["/readyz"]["get"]["responses"]["503"] = {"description": "Not ready",
                                                          "content": _json(Readiness)}
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    for model in models:
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(schema.pop("$defs", {}))
        schemas[model.__name__] = schema
    app.openapi_schema = doc
    return doc
