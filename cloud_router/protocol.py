"""OpenAI's wire shapes the router produces itself: error bodies and SSE error events."""

from __future__ import annotations

import json


def error_body(message: str, type_: str, code: str | None = None,
               param: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def sse_error_event(message: str, code: str = "upstream_stream_broken") -> bytes:
    """The last event of a stream that broke after its first byte (OpenAI sends errors in a
    stream as a ``data:`` event holding an ``error`` object; its SDK raises on it)."""
    body = error_body(message, "server_error", code)
    return b"data: " + json.dumps(body).encode() + b"\n\n"


def model_list(models: list[str]) -> dict:
    return {"object": "list", "data": [
        {"id": m, "object": "model", "created": 0, "owned_by": "edgegen"} for m in models]}
