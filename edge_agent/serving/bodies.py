"""Reading a request's JSON body, for REST and MQTT alike: what a client may send before any
work is done on it (its size is bounded before, by ``rest.limits`` or the MQTT payload limit).

The router reads bodies with the same rules (``cloud_router/limits.py``); the packages share
no code, and tests/test_wire_contracts.py pins the two together.
"""

from __future__ import annotations

import json
from typing import Any

from edge_agent.serving.protocol import ErrorResult, error

MAX_JSON_DEPTH = 64          # nesting of objects and arrays a request body may have


def decode_json(raw: bytes, *, max_depth: int = MAX_JSON_DEPTH) -> Any | ErrorResult:
    """A request body's JSON, or the 400 that says what is wrong with it: not UTF-8, not JSON,
    ``NaN``/``Infinity`` (not JSON, though Python's parser takes them), nested deeper than
    ``max_depth``, or a string holding a lone UTF-16 surrogate (``"\ud800"`` is valid JSON
    but no text: tokenizers and UTF-8 writers fail on it). The body's size is bounded
    before this is called (``rest.limits``, the MQTT payload limit)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return error(400, f"the request body is not valid UTF-8 (byte {exc.start})",
                     code="invalid_utf8")
    try:
        body = json.loads(text, parse_constant=_no_constant)
    except RecursionError:
        return _too_deep(max_depth)
    except ValueError as exc:  # JSONDecodeError, and the constants refused above
        return error(400, f"the request body is not valid JSON: {exc}", code="invalid_json")
    problem = _check_json(body, max_depth)
    return problem if problem is not None else body


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _too_deep(max_depth: int) -> ErrorResult:
    return error(400, f"the request body is nested deeper than {max_depth} levels",
                 code="invalid_json")


def _check_json(value: Any, max_depth: int) -> ErrorResult | None:
    """Depth and lone surrogates, without recursion (a deep body must not recurse here)."""
    stack = [(value, 1, "")]
    while stack:
        item, depth, path = stack.pop()
        if isinstance(item, str):
            if not item.isascii():
                try:
                    item.encode("utf-8")
                except UnicodeEncodeError:
                    return error(400, f"{path or 'the body'} holds a lone UTF-16 surrogate, "
                                 "which is not text", param=path or None, code="invalid_utf8")
            continue
        if isinstance(item, dict | list):
            if depth > max_depth:
                return _too_deep(max_depth)
            pairs = item.items() if isinstance(item, dict) else enumerate(item)
            for key, child in pairs:
                child_path = f"{path}.{key}" if path else str(key)
                if isinstance(key, str):
                    stack.append((key, depth, path))
                stack.append((child, depth + 1, child_path))
    return None
