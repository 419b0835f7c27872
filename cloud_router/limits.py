"""What a client may send the router before it spends anything on it: a bounded body read
within a deadline, a request head within a deadline, and JSON a downstream agent can read.

The agent enforces the same limits (``edge_agent.rest.limits``,
``edge_agent.serving.bodies``); the packages share no code, and tests/test_wire_contracts.py sends the same
bad bodies to both and pins the answers together. A client's mistake is answered here (4xx)
and never forwarded, so an edge never answers it 500 and is never ejected for it.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from cloud_router.protocol import error_body

DEFAULT_MAX_BODY_BYTES = 2 * 1024 * 1024
DEFAULT_READ_TIMEOUT_S = 30.0
DEFAULT_HEAD_TIMEOUT_S = 10.0
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
        body = json.loads(text, parse_constant=_no_constant)
    except RecursionError:
        raise BadBody(_too_deep(max_depth), "invalid_json") from None
    except ValueError as exc:
        raise BadBody(f"the request body is not valid JSON: {exc}", "invalid_json") from None
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


def _too_deep(max_depth: int) -> str:
    return f"the request body is nested deeper than {max_depth} levels"


class BodyLimit:
    """ASGI middleware: 413 for a body over ``max_bytes`` (before reading it when
    ``Content-Length`` says so), 408 for one that does not arrive within ``read_timeout``.
    ``read`` is the same rule for an app that reads its body itself (the forwarded paths)."""

    def __init__(self, app, *, max_bytes: int = DEFAULT_MAX_BODY_BYTES,
                 read_timeout: float = DEFAULT_READ_TIMEOUT_S, on_refused=None):
        self.app = app
        self.max_bytes = max_bytes
        self.read_timeout = read_timeout
        self.on_refused = on_refused  # called with the status (metrics)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        body = await self.read(scope, receive, send)
        if body is None:
            return None
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)

    async def read(self, scope, receive, send) -> bytes | None:
        """The whole body; None when it was refused here (answered 413 or 408) or the client
        went away."""
        length = _header(scope, b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            await self._refuse(send, 413, self._too_large(length))
            return None
        try:
            async with asyncio.timeout(self.read_timeout):
                body = await self._read(receive)
        except TimeoutError:
            await self._refuse(send, 408, f"the request body did not arrive within "
                                          f"{self.read_timeout:g} s")
            return None
        if body is _TOO_LARGE:
            await self._refuse(send, 413, self._too_large(None))
            return None
        return body   # None: the client went away

    async def _read(self, receive) -> bytes | object | None:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        body = message.get("body", b"")
        if not message.get("more_body", False):   # the usual case: one message
            return body if len(body) <= self.max_bytes else _TOO_LARGE
        parts, size = [body], len(body)
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                return _TOO_LARGE
            parts.append(chunk)
            if not message.get("more_body", False):
                return b"".join(parts)

    def _too_large(self, length: bytes | None) -> str:
        said = f" ({length.decode(errors='replace')} bytes)" if length else ""
        return f"the request body{said} is over this server's limit of {self.max_bytes} bytes"

    async def _refuse(self, send, status: int, message: str) -> None:
        if self.on_refused is not None:
            self.on_refused(status)
        code = "request_too_large" if status == 413 else "request_timeout"
        body = json.dumps(error_body(status, message, code=code)).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


_TOO_LARGE = object()


def _header(scope, name: bytes) -> bytes | None:
    for key, value in scope["headers"]:
        if key == name:
            return value
    return None


class HeadTimeoutProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol (C parser), closing a connection whose request head has not
    arrived ``head_timeout`` seconds after it opened or its last response ended (slowloris)."""

    head_timeout = DEFAULT_HEAD_TIMEOUT_S
    _head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm_head_timer()

    def on_headers_complete(self) -> None:
        self._cancel_head_timer()
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm_head_timer()

    def connection_lost(self, exc) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)

    def _arm_head_timer(self) -> None:
        self._cancel_head_timer()
        if not self.transport.is_closing():
            self._head_timer = self.loop.call_later(self.head_timeout, self._head_late)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_late(self) -> None:
        self._head_timer = None
        if self.cycle is None or self.cycle.response_complete:
            self.transport.close()


def head_timeout_protocol(seconds: float) -> type[HeadTimeoutProtocol]:
    return type("HeadTimeoutProtocol", (HeadTimeoutProtocol,), {"head_timeout": seconds})
