"""What a client may send the router before it spends anything on it: the limits (the front,
``cloud_router.front``, enforces the body's size and the head's and body's deadlines), and
JSON a downstream agent can read.

The agent enforces the same limits (``edge_agent.rest.limits``,
``edge_agent.serving.bodies``); the packages share no code, and tests/test_wire_contracts.py sends the same
bad bodies to both and pins the answers together. A client's mistake is answered here (4xx)
and never forwarded, so an edge never answers it 500 and is never ejected for it.
"""

from __future__ import annotations

import json
from typing import Any

DEFAULT_MAX_BODY_BYTES = 2 * 1024 * 1024
DEFAULT_READ_TIMEOUT_S = 30.0
DEFAULT_HEAD_TIMEOUT_S = 10.0
# request line and headers (HAProxy's whole buffer is 16 KiB; the agent's h11, 16 KiB)
DEFAULT_MAX_HEAD_BYTES = 64 * 1024
MAX_JSON_DEPTH = 64


class BadBody(ValueError):
    """A body the router refuses: ``status``, ``message`` and OpenAI ``code``."""

    def __init__(self, message: str, code: str, param: str | None = None):
        super().__init__(message)
        self.code, self.param = code, param


def decode_json(raw: bytes, *, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """The body's JSON; BadBody when it is not UTF-8, not JSON (``NaN`` included), nested
    deeper than ``max_depth`` or holds a string with a lone UTF-16 surrogate."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadBody(f"the request body is not valid UTF-8 (byte {exc.start})",
                      "invalid_utf8") from None
    try:
        body = _DECODER.decode(text)
    except RecursionError:
        raise BadBody(_too_deep(max_depth), "invalid_json") from None
    except ValueError as exc:
        raise BadBody(f"the request body is not valid JSON: {exc}", "invalid_json") from None
    if raw.count(b"[") + raw.count(b"{") <= max_depth and b"\\u" not in raw:
        return body   # neither too deep nor any escape that could make a surrogate: no walk
    stack = [(body, 1, "")]
    while stack:  # no recursion: a deep body must not recurse here either
        item, depth, path = stack.pop()
        if isinstance(item, str):
            if not item.isascii():
                try:
                    item.encode("utf-8")
                except UnicodeEncodeError:
                    raise BadBody(f"{path or 'the body'} holds a lone UTF-16 surrogate, which "
                                  "is not text", "invalid_utf8", path or None) from None
        elif isinstance(item, dict | list):
            if depth > max_depth:
                raise BadBody(_too_deep(max_depth), "invalid_json")
            pairs = item.items() if isinstance(item, dict) else enumerate(item)
            for key, child in pairs:
                if isinstance(key, str):
                    stack.append((key, depth, path))
                stack.append((child, depth + 1, f"{path}.{key}" if path else str(key)))
    return body


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


# one decoder: json.loads with an argument builds a new one per call
_DECODER = json.JSONDecoder(parse_constant=_no_constant)


def _too_deep(max_depth: int) -> str:
    return f"the request body is nested deeper than {max_depth} levels"
