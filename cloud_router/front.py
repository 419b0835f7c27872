"""The router's HTTP/1.1 server: the forwarded OpenAI paths answered straight from the
connection, every other request through the ASGI app (the router's own pages, FastAPI).

Every request of the fleet passes through the forwarded paths, so they skip the ASGI cycle
(a scope, message dicts and a response object per request). Measured under wrk with no
routing at all, uvicorn and a bare forwarding app cost 46 us of CPU per request where a
bare protocol costs 13. One protocol instance per connection parses with httptools' C
parser and writes each answer in one ``write``. What uvicorn gave the router, it keeps:

- a request head must arrive within ``head_timeout_s`` of the connection opening or of its
  last answer (slowloris), a body within ``body_timeout_s`` (408);
- a body over ``max_body_bytes`` is answered 413 before it is read (``Content-Length``) or as
  soon as it passes the limit, and the connection is closed: nothing beyond it is kept; a
  request head over ``max_head_bytes``, 431;
- a request that is not HTTP is answered 400 in OpenAI's error shape, and the connection
  closed;
- keep-alive and pipelining (answers in request order), ``Expect: 100-continue``, HTTP/1.0;
- a stream goes out chunk by chunk as its events arrive, waiting when the client reads
  slowly; a client that leaves is noticed at once and its upstream stream closed;
- SIGINT/SIGTERM: stop accepting, let requests in flight finish, run the app's shutdown.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from urllib.parse import unquote

import httptools

from cloud_router.errors import RouterError
from cloud_router.exchange import Handler, Reply, Request, json_reply
from cloud_router.front_asgi import AsgiExchange, Lifespan
from cloud_router.limits import (
    DEFAULT_HEAD_TIMEOUT_S,
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_MAX_HEAD_BYTES,
    DEFAULT_READ_TIMEOUT_S,
)
from cloud_router.protocol import error_body

log = logging.getLogger(__name__)

LINGER_S = 2.0   # how long a refused client's remaining bytes are read and dropped


@dataclass(frozen=True)
class FrontConfig:
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_head_bytes: int = DEFAULT_MAX_HEAD_BYTES
    head_timeout_s: float = DEFAULT_HEAD_TIMEOUT_S
    body_timeout_s: float = DEFAULT_READ_TIMEOUT_S


_STATUS_LINES = {s.value: f"HTTP/1.1 {s.value} {s.phrase}\r\n".encode() for s in HTTPStatus}


def _status_line(status: int) -> bytes:
    return _STATUS_LINES.get(status) or f"HTTP/1.1 {status} Unknown\r\n".encode()


class Connection(asyncio.Protocol):
    """One client connection: requests parsed as they arrive, answered one at a time."""

    def __init__(self, server: FrontServer):
        self.server, self.handler, self.config = server, server.handler, server.config
        self.loop = server.loop
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.queue: collections.deque[Request] = collections.deque()
        self.busy = False
        self.closing = False         # no more requests are read: answer what is in, close
        self.left: asyncio.Future | None = None   # done when the client went away
        self._timer: asyncio.TimerHandle | None = None
        self._refusal: Reply | None = None   # a refusal waiting for the answer being written
        self.writable: asyncio.Future | None = None
        self._url, self._headers, self._body, self._size = b"", [], [], 0
        self._in_head, self._head_size = True, 0   # bytes of a head still being read
        self._done = 0   # requests read whole

    # -- asyncio ----------------------------------------------------------------------------

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.left = self.loop.create_future()
        self.server.connections.add(self)
        self._arm(self.config.head_timeout_s, self._head_late)

    def connection_lost(self, exc) -> None:
        self.server.connections.discard(self)
        self._disarm()
        if not self.left.done():
            self.left.set_result(None)
        if self.writable is not None and not self.writable.done():
            self.writable.set_result(None)

    def pause_writing(self) -> None:
        self.writable = self.loop.create_future()

    def resume_writing(self) -> None:
        if self.writable is not None and not self.writable.done():
            self.writable.set_result(None)
        self.writable = None

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return
        try:
            done = self._done
            self.parser.feed_data(data)
            # a head that has not ended, with no request ended in this chunk: count it whole
            # (a chunk that ended one holds less than a chunk of the next head)
            if self._in_head and done == self._done:
                self._head_size += len(data)
                if self._head_size > self.config.max_head_bytes:
                    self._refuse(431, f"the request head is over this server's limit of "
                                 f"{self.config.max_head_bytes} bytes",
                                 "request_header_fields_too_large")
        except httptools.HttpParserUpgrade:   # (h2c, websocket) not offered: answered as
            self.closing = True                # plain HTTP/1.1, then the connection closes
            if self.queue:
                self.queue[-1].keep_alive = False
        except httptools.HttpParserError as exc:
            if not self.closing:
                self._refuse(400, f"malformed HTTP request: {exc}", "invalid_request")

    # -- httptools --------------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._url, self._headers, self._body, self._size = b"", [], [], 0
        self._in_head = True

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        self._disarm()
        self._in_head, self._head_size = False, 0
        length = next((v for k, v in self._headers if k == b"content-length"), None)
        limit = self.config.max_body_bytes
        if length is not None and (not length.isdigit() or int(length) > limit):
            self._refuse_large(length)
            return
        if any(k == b"expect" and v.lower() == b"100-continue" for k, v in self._headers):
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        self._arm(self.config.body_timeout_s, self._body_late)

    def on_body(self, body: bytes) -> None:
        if self.closing:
            return
        self._size += len(body)
        if self._size > self.config.max_body_bytes:
            self._refuse_large(None)
            return
        self._body.append(body)

    def on_message_complete(self) -> None:
        self._done += 1
        if self.closing:
            return
        self._disarm()
        parsed = httptools.parse_url(self._url)
        raw_path = parsed.path or b"/"
        p = self.parser
        self.queue.append(Request(
            method=p.get_method().decode("ascii"), path=unquote(raw_path.decode("latin-1")),
            raw_path=raw_path, query=parsed.query or b"", headers=self._headers,
            body=b"".join(self._body), keep_alive=p.should_keep_alive(),
            http_version=p.get_http_version()))
        if len(self.queue) > 8:   # a client pipelining far ahead waits for its answers
            self.transport.pause_reading()
        if not self.busy:
            self.busy = True
            self.loop.create_task(self._answer_all())

    # -- answering --------------------------------------------------------------------------

    async def _answer_all(self) -> None:
        try:
            while self.queue and not self.left.done():
                request = self.queue.popleft()
                try:
                    keep = await self._answer(request)
                except Exception:   # a bug: this connection ends, the server goes on
                    log.exception("answering a request failed", extra={"path": request.path})
                    keep = False
                if not keep or (self.closing and not self.queue):   # the last one read
                    self.closing = True
                    self.queue.clear()
                    if keep and self._refusal is not None and not self.left.done():
                        self._send_refusal(self._refusal)
                    else:
                        self.transport.close()
                    return
                if not self.transport.is_closing():
                    self.transport.resume_reading()
        finally:
            self.busy = False
        if not self.closing and not self.left.done():
            if self.server.stopping:
                self.transport.close()
            else:
                self._arm(self.config.head_timeout_s, self._head_late)

    async def _answer(self, request: Request) -> bool:
        """Answers one request; whether the connection may carry another."""
        keep = request.keep_alive and not self.server.stopping
        if self.handler.native(request.method, request.path):
            try:
                reply = await self.handler.handle(request)
            except Exception:   # a bug here must not take the connection's other requests
                log.exception("forwarded request failed", extra={"path": request.path})
                reply = json_reply(500, error_body(500, "internal error in the router"))
            if reply.stream is None:
                self.write_whole(reply, keep)
                return keep
            return await self._write_stream(reply, keep, request.http_version)
        return await AsgiExchange(self, request, keep).run(self.handler.asgi)

    def write(self, data: bytes) -> None:
        """Writes unless the client is gone (uvloop raises on a closed transport; an answer
        finished after its client left goes nowhere)."""
        if not self.transport.is_closing():
            self.transport.write(data)

    def write_chunk(self, data: bytes) -> None:
        """One chunk of a chunked answer (an empty one ends it)."""
        self.write(b"%x\r\n%s\r\n" % (len(data), data))

    def head(self, status: int, headers, keep: bool) -> bytes:
        lines = [_status_line(status)]
        lines += [k + b": " + v + b"\r\n" for k, v in headers]
        if not keep:
            lines.append(b"connection: close\r\n")
        lines.append(b"\r\n")
        return b"".join(lines)

    def write_whole(self, reply: Reply, keep: bool) -> None:
        headers = [*reply.headers, (b"content-length", str(len(reply.body)).encode())]
        self.write(self.head(reply.status, headers, keep) + reply.body)

    async def _write_stream(self, reply: Reply, keep: bool, version: str) -> bool:
        """Sends a stream's events as they arrive while watching for the client leaving, and
        always closes the stream (which releases the upstream, and so cancels its generation
        when the client left)."""
        chunked = version != "1.0"
        keep = keep and chunked
        headers = [*reply.headers, *([(b"transfer-encoding", b"chunked")] if chunked else [])]
        stream, delivered = reply.stream, False
        events = stream.events()

        async def pump() -> None:
            nonlocal delivered
            self.write(self.head(reply.status, headers, keep))
            async for event in events:
                if chunked:
                    self.write_chunk(event)
                else:
                    self.write(event)
                if self.writable is not None:
                    await self.writable
                if self.left.done():
                    return
            if chunked:
                self.write_chunk(b"")
            delivered = True

        pumping = asyncio.ensure_future(pump())
        try:
            await asyncio.wait((pumping, self.left), return_when=asyncio.FIRST_COMPLETED)
        finally:
            pumping.cancel()
            with contextlib.suppress(asyncio.CancelledError, OSError):
                await pumping
            await events.aclose()
            await asyncio.shield(stream.close(delivered))
        return keep and delivered

    # -- refusals and deadlines ---------------------------------------------------------------

    def _refuse(self, status: int, message: str, code: str) -> None:
        """Answers ``status`` at once and closes: the request is not read further."""
        self.handler.refused(status)
        self.closing = True
        self._disarm()
        reply = json_reply(status, error_body(status, message, code=code))
        if self.busy:   # an answer is being written: this one follows it
            self._refusal = reply
            return
        self._send_refusal(reply)

    def _send_refusal(self, reply: Reply) -> None:
        """Writes the refusal, then a lingering close (nginx's, HTTP/1.1's section 9.6): our
        side ends (FIN) and what the client still sends is read and dropped for a moment.
        Closing with its bytes unread would send a reset, which may destroy the answer
        before the client reads it."""
        self.write_whole(reply, keep=False)
        if self.transport.is_closing():
            return
        if not self.transport.can_write_eof():
            self.transport.close()
            return
        self.transport.write_eof()
        self.transport.resume_reading()   # data_received drops it: the connection is closing
        self._arm(LINGER_S, self.transport.close)

    def _refuse_large(self, length: bytes | None) -> None:
        said = f" ({length.decode(errors='replace')} bytes)" if length else ""
        self._refuse(413, f"the request body{said} is over this server's limit of "
                     f"{self.config.max_body_bytes} bytes", "request_too_large")

    def _arm(self, seconds: float, then: Callable[[], None]) -> None:
        self._disarm()
        self._timer = self.loop.call_later(seconds, then)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _head_late(self) -> None:
        self._timer = None
        if not self.busy:
            self.transport.close()

    def _body_late(self) -> None:
        self._timer = None
        self._refuse(408, f"the request body did not arrive within "
                     f"{self.config.body_timeout_s:g} s", "request_timeout")


class FrontServer:
    """Serves ``handler`` on ``host:port`` until ``should_exit`` is set or SIGINT/SIGTERM.

    ``run`` blocks (its own event loop; uvloop); ``started`` is set once it listens and the
    app's startup has run. The same interface as uvicorn's ``Server`` for the tests' threads.
    """

    def __init__(self, handler: Handler, host: str, port: int,
                 config: FrontConfig = FrontConfig(), *, graceful_s: float = 15.0,
                 install_signals: bool = True, reuse_port: bool = False,
                 on_started: Callable[[], None] | None = None):
        self.handler, self.host, self.port, self.config = handler, host, port, config
        self.graceful_s, self.install_signals = graceful_s, install_signals
        self.reuse_port, self.on_started = reuse_port, on_started
        self.connections: set[Connection] = set()
        self.started = self.should_exit = self.stopping = False
        self.loop: asyncio.AbstractEventLoop | None = None

    def run(self) -> None:
        import uvloop

        uvloop.run(self.serve())

    async def serve(self) -> None:
        self.loop = asyncio.get_running_loop()
        try:   # bound first, so a taken port fails at once; served after the app's startup
            server = await self.loop.create_server(
                lambda: Connection(self), self.host, self.port, backlog=2048,
                reuse_address=True, reuse_port=self.reuse_port or None, start_serving=False)
        except OSError as exc:
            raise RouterError(f"cannot listen on {self.host}:{self.port}: "
                              f"{os.strerror(exc.errno) if exc.errno else exc}") from None
        lifespan = Lifespan(self.handler.asgi)
        await lifespan.startup()
        await server.start_serving()
        stop = asyncio.Event()
        if self.install_signals:
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.loop.add_signal_handler(sig, stop.set)
        self.started = True
        if self.on_started is not None:
            self.on_started()
        log.info("router listening", extra={"host": self.host, "port": self.port})
        try:
            while not (stop.is_set() or self.should_exit):
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(stop.wait(), 0.1)
        finally:
            self.stopping = True
            server.close()
            for conn in list(self.connections):   # idle keep-alive connections: close now
                if not conn.busy:
                    conn.transport.close()
            deadline = self.loop.time() + self.graceful_s
            while any(c.busy for c in self.connections) and self.loop.time() < deadline:
                await asyncio.sleep(0.05)
            for conn in list(self.connections):
                conn.transport.close()
            await lifespan.shutdown()
