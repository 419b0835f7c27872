"""OpenAI's wire shapes the router produces itself: error bodies and SSE error events.

``ERROR_TYPES`` is the one map from an HTTP status to OpenAI's error ``type`` on the router's
side; the agent keeps an equal copy (the packages share no code) and a contract test pins the
two together. Callers pass a status, never a type string.
"""

from __future__ import annotations

import json

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error",
               403: "permission_error", 404: "not_found_error", 413: "invalid_request_error",
               429: "rate_limited", 500: "server_error", 503: "service_unavailable"}


def error_type(status: int) -> str:
    """OpenAI's error type for ``status``; a status outside the map gets its class's type."""
    return ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")


def error_body(status: int, message: str, *, code: str | None = None,
               param: str | None = None) -> dict:
    """OpenAI's error body for ``status``: ``{"error": {"message", "type", "param", "code"}}``."""
    return {"error": {"message": message, "type": error_type(status), "param": param,
                      "code": code}}


def sse_error_event(message: str, code: str = "upstream_stream_broken") -> bytes:
    """The last event of a stream that broke after its first byte (OpenAI sends errors in a
    stream as a ``data:`` event holding an ``error`` object; its SDK raises on it)."""
    return b"data: " + json.dumps(error_body(500, message, code=code)).encode() + b"\n\n"


def model_card(model: str) -> dict:
    """One entry of ``model_list``, and the answer of ``GET /v1/models/{model}``."""
    return {"id": model, "object": "model", "created": 0, "owned_by": "edgegen"}


def model_list(models: list[str]) -> dict:
    return {"object": "list", "data": [model_card(m) for m in models]}
