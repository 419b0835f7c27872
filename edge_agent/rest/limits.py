"""What a client may send before the agent spends anything on it: a bounded body, read within
a deadline, and a request head that must arrive within a deadline.

- ``BodyLimit`` (ASGI middleware) reads each request body itself, up to ``max_bytes``: a
  ``Content-Length`` over the limit is answered 413 before a byte of the body is read, a body
  that grows past it is answered 413 as soon as it does (nothing more is kept), and a body
  that does not arrive within ``read_timeout`` is answered 408. The app then reads the body
  from memory. Errors are OpenAI-shaped, as every other answer of the agent.
- ``HeadTimeoutH11Protocol``: uvicorn closes idle keep-alive connections, but a client that
  sends half a request line and then waits holds its connection for ever (slowloris). This
  protocol closes a connection whose request head has not arrived ``head_timeout`` seconds
  after the connection opened or its previous response ended.
"""

from __future__ import annotations

import asyncio
import json

from uvicorn.protocols.http.h11_impl import H11Protocol

from edge_agent.serving.protocol import error

DEFAULT_MAX_BODY_BYTES = 2 * 1024 * 1024
DEFAULT_READ_TIMEOUT_S = 30.0
DEFAULT_HEAD_TIMEOUT_S = 10.0


class BodyLimit:
    def __init__(self, app, *, max_bytes: int = DEFAULT_MAX_BODY_BYTES,
                 read_timeout: float = DEFAULT_READ_TIMEOUT_S):
        self.app = app
        self.max_bytes = max_bytes
        self.read_timeout = read_timeout

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            return await self._refuse(send, 413, self._too_large(length))
        try:
            body = await asyncio.wait_for(self._read(receive), self.read_timeout)
        except asyncio.TimeoutError:
            return await self._refuse(send, 408, f"the request body did not arrive within "
                                                 f"{self.read_timeout:g} s")
        if body is None:
            return await self._refuse(send, 413, self._too_large(None))
        if isinstance(body, dict):  # the client went away: nothing to answer
            return None
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: wait for the disconnect, as usual

        return await self.app(scope, replay, send)

    async def _read(self, receive) -> bytes | dict | None:
        """The whole body; None past the limit; the disconnect message if the client left."""
        parts, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return message
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                return None
            parts.append(chunk)
            if not message.get("more_body", False):
                return b"".join(parts)

    def _too_large(self, length: bytes | None) -> str:
        said = f" ({length.decode(errors='replace')} bytes)" if length else ""
        return f"the request body{said} is over this server's limit of {self.max_bytes} bytes"

    @staticmethod
    async def _refuse(send, status: int, message: str) -> None:
        code = "request_too_large" if status == 413 else "request_timeout"
        body = json.dumps(error(status, message, code=code).body).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


class HeadTimeoutH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, closing connections whose request head is late (see above).
    Give uvicorn ``http=head_timeout_protocol(seconds)``."""

    head_timeout = DEFAULT_HEAD_TIMEOUT_S

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm_head_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm_head_timer()

    def handle_events(self) -> None:
        before = self.cycle
        super().handle_events()
        if self.cycle is not before:  # a request head arrived
            self._cancel_head_timer()

    def connection_lost(self, exc) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)

    def _arm_head_timer(self) -> None:
        self._cancel_head_timer()
        if not self.transport.is_closing():
            self._head_timer = self.loop.call_later(self.head_timeout, self._head_late)

    def _cancel_head_timer(self) -> None:
        timer = getattr(self, "_head_timer", None)
        if timer is not None:
            timer.cancel()
            self._head_timer = None

    def _head_late(self) -> None:
        self._head_timer = None
        if self.cycle is None or self.cycle.response_complete:
            self.transport.close()


def head_timeout_protocol(seconds: float) -> type[HeadTimeoutH11Protocol]:
    return type("HeadTimeoutH11Protocol", (HeadTimeoutH11Protocol,), {"head_timeout": seconds})
