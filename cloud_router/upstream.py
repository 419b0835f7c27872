"""The router's HTTP/1.1 client to its upstream agents: pooled keep-alive connections, each an
asyncio protocol fed to httptools' C response parser.

It replaces aiohttp's client on the hot path: aiohttp builds a request object, a payload, a
header multidict, a response object and a timer per request, about 90 us of the router's
CPU per forwarded request under load (py-spy, ``benchmarks/router.py --part overhead``);
a request here is one ``write`` of bytes and a parser callback per part of the answer.

What it guarantees:

- ``request`` answers once the response head has arrived, or raises: ``ConnectFailed`` when
  no connection could be made (refused, unreachable: the endpoint is gone), ``UpstreamError``
  for anything else (a timeout, a broken connection, an answer that is not HTTP).
- A request written on a pooled connection that the agent had closed while idle (it keeps
  idle connections 5 s, the pool 30 s) is sent once more on a new connection, as long as no
  byte of an answer came back: that failure says nothing of the endpoint.
- ``read_timeout_s`` bounds every wait for a byte: the head, the body, each stream chunk.
- A body read to its end gives the connection back to the pool (``release``); ``close``
  closes it, which is how the router cancels a generation whose client left.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import AsyncIterator

import httptools


class UpstreamError(Exception):
    """The upstream did not answer as HTTP should: timeout, broken connection, garbage."""


class ConnectFailed(UpstreamError):
    """No connection could be made: refused or unreachable."""


class _Gone(UpstreamError):
    """A pooled connection that was closed before any byte of the answer came back."""


_HIGH_WATER = 1 << 20   # bytes of a stream buffered before reading from the agent pauses


class _Connection(asyncio.Protocol):
    """One keep-alive connection; it carries one request at a time."""

    def __init__(self, loop: asyncio.AbstractEventLoop, read_timeout_s: float):
        self.loop, self.read_timeout_s = loop, read_timeout_s
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.idle_since = 0.0
        self.response: UpstreamResponse | None = None

    # -- asyncio ----------------------------------------------------------------------------

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if self.response is None:   # bytes nobody asked for: the connection is not reusable
            self.transport.close()
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(UpstreamError(f"the upstream's answer is not HTTP: {exc}"))
            self.transport.close()

    def connection_lost(self, exc) -> None:
        self.closed = True
        r = self.response
        if r is not None and not r.complete:
            if r.head is None and r.reused:
                self._fail(_Gone("the pooled connection was closed"))
            else:
                self._fail(UpstreamError(f"connection closed: {exc or 'EOF'}"))

    # -- httptools --------------------------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        self.response._raw_headers.append((name, value))

    def on_headers_complete(self) -> None:
        r = self.response
        r.status = self.parser.get_status_code()
        r.head = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in r._raw_headers}
        r._wake()

    def on_body(self, body: bytes) -> None:
        r = self.response
        r._chunks.append(body)
        r._buffered += len(body)
        if r._buffered > _HIGH_WATER and r.head is not None and not r._paused:
            r._paused = True
            self.transport.pause_reading()
        r._wake()

    def on_message_complete(self) -> None:
        r = self.response
        r.complete = True
        r.keep_alive = self.parser.should_keep_alive()
        r._wake()

    def _fail(self, exc: UpstreamError) -> None:
        r = self.response
        if r is not None and not r.complete and r.error is None:
            r.error = exc
            r._wake()


class UpstreamResponse:
    """An answer whose head has arrived: ``status``, ``headers`` (lower-case names), and its
    body through ``read`` (whole) or ``chunks`` (as it arrives), then ``release`` or
    ``close``."""

    def __init__(self, pool: UpstreamPool, conn: _Connection, key, reused: bool):
        self._pool, self._conn, self._key, self.reused = pool, conn, key, reused
        self.status = 0
        self.head: dict[str, str] | None = None
        self._raw_headers: list[tuple[bytes, bytes]] = []
        self._chunks: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._paused = False
        self.complete = False
        self.keep_alive = False
        self.error: UpstreamError | None = None
        self._waiter: asyncio.Future | None = None
        self._done = False

    @property
    def headers(self) -> dict[str, str]:
        return self.head or {}

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    async def _wait(self) -> None:
        """Until the connection says something new, at most the read timeout."""
        if self.error is not None:
            raise self.error
        loop = self._conn.loop
        self._waiter = loop.create_future()
        timer = loop.call_later(self._conn.read_timeout_s, self._timed_out)
        try:
            await self._waiter
        finally:
            timer.cancel()
            self._waiter = None
        if self.error is not None:
            raise self.error

    def _timed_out(self) -> None:
        self._conn._fail(UpstreamError(
            f"no byte from the upstream within {self._conn.read_timeout_s:g} s"))
        self._conn.transport.close()

    async def _head(self) -> None:
        while self.head is None:
            await self._wait()

    async def read(self) -> bytes:
        """The whole body."""
        while not self.complete:
            await self._wait()
        body = b"".join(self._chunks)
        self._chunks.clear()
        return body

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body's bytes as they arrive (chunked transfer coding already removed)."""
        while True:
            if self._chunks:
                data = b"".join(self._chunks)
                self._chunks.clear()
                self._buffered = 0
                if self._paused:
                    self._paused = False
                    self._conn.transport.resume_reading()
                yield data
            elif self.complete:
                return
            else:
                await self._wait()

    def release(self) -> None:
        """Done with the answer: a connection whose answer was read to its end goes back to
        the pool, any other is closed."""
        if self._done:
            return
        self._done = True
        conn = self._conn
        conn.response = None
        if self.complete and self.keep_alive and not conn.closed and not self._chunks:
            self._pool._put(self._key, conn)
        else:
            self._pool._drop(conn)

    def close(self) -> None:
        """Done with the answer, whatever was read: the connection is closed (the agent sees
        its client leave)."""
        if self._done:
            return
        self._done = True
        self._conn.response = None
        self._pool._drop(self._conn)


class UpstreamPool:
    """Keep-alive connections to the upstreams, idle ones kept per (host, port)."""

    def __init__(self, *, connect_timeout_s: float = 2.0, read_timeout_s: float = 120.0,
                 keepalive_expiry_s: float = 30.0, max_connections: int = 512):
        self.connect_timeout_s, self.read_timeout_s = connect_timeout_s, read_timeout_s
        self.keepalive_expiry_s = keepalive_expiry_s
        self._idle: dict[tuple[str, int], list[_Connection]] = {}
        self._open = 0
        self.max_connections = max_connections

    async def request(self, host: str, port: int, path: str, headers: list[tuple[str, str]],
                      body: bytes, method: str = "POST") -> UpstreamResponse:
        head = "".join(f"{k}: {v}\r\n" for k, v in headers)
        authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        raw = (f"{method} {path} HTTP/1.1\r\nhost: {authority}\r\n{head}"
               f"content-length: {len(body)}\r\n\r\n").encode("latin-1") + body
        key = (host, port)
        conn, reused = self._take(key), True
        while True:
            if conn is None:
                conn, reused = await self._connect(key), False
            response = UpstreamResponse(self, conn, key, reused)
            conn.response = response
            conn.transport.write(raw)
            try:
                await response._head()
                return response
            except _Gone:   # closed while idle: says nothing of the endpoint; once more
                response.close()
                conn = None
            except BaseException:
                response.close()
                raise

    def _take(self, key) -> _Connection | None:
        idle = self._idle.get(key)
        now = time.monotonic()
        while idle:
            conn = idle.pop()
            if not conn.closed and now - conn.idle_since < self.keepalive_expiry_s:
                return conn
            self._drop(conn)
        return None

    def _drop(self, conn: _Connection) -> None:
        """Closes a connection of this pool, for good."""
        conn.transport.close()
        self._open -= 1

    def _put(self, key, conn: _Connection) -> None:
        conn.idle_since = time.monotonic()
        self._idle.setdefault(key, []).append(conn)

    async def _connect(self, key) -> _Connection:
        if self.max_connections and self._open >= self.max_connections:
            self._close_idle()
            if self._open >= self.max_connections:
                raise UpstreamError(f"all {self.max_connections} upstream connections are "
                                    "in use")
        loop = asyncio.get_running_loop()
        try:
            _, conn = await asyncio.wait_for(loop.create_connection(
                lambda: _Connection(loop, self.read_timeout_s), *key), self.connect_timeout_s)
        except TimeoutError:
            raise UpstreamError(f"connect to {key[0]}:{key[1]} timed out after "
                                f"{self.connect_timeout_s:g} s") from None
        except OSError as exc:
            raise ConnectFailed(f"cannot connect to {key[0]}:{key[1]}: "
                                f"{exc.strerror or exc}") from None
        self._open += 1
        return conn

    def _close_idle(self) -> None:
        for idle in self._idle.values():
            for conn in idle:
                self._drop(conn)
            idle.clear()

    async def aclose(self) -> None:
        self._close_idle()
