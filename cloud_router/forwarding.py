"""Sending a request to the chosen endpoint, and trying another one when that fails.

The one module that talks to upstream agents (httpx, one pooled keep-alive client). Rules:

- Retry on connect errors, timeouts and broken connections before the response headers, and on
  5xx and 429 answers, **only while nothing has been sent to the client** and each time on an
  endpoint this request has not tried, within the table's retry budget. A non-streaming answer
  is read whole before it is sent, and a stream's first chunk is read before the headers go
  out, so both stay retryable up to that point.
- SSE passes through event by event as it arrives (a partial event waits for its end, so a
  stream that breaks never leaves half an event behind). A stream that breaks after the first
  byte ends with an OpenAI-shaped error event. A client that disconnects closes the upstream
  response, which closes the upstream connection and so cancels the generation.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import AsyncIterator, Awaitable, Callable

import anyio
import httpx
from starlette.responses import JSONResponse, Response, StreamingResponse

from cloud_router.endpoints import Endpoint
from cloud_router.metrics import RouterMetrics
from cloud_router.policy import Decision, RequestHints
from cloud_router.protocol import error_body, sse_error_event
from cloud_router.table import EndpointTable

log = logging.getLogger(__name__)

FORWARDED_REQUEST_HEADERS = ("content-type", "accept", "user-agent", "x-request-id",
                             "traceparent", "tracestate")
DROPPED_RESPONSE_HEADERS = {"connection", "keep-alive", "transfer-encoding", "content-length",
                            "date", "server", "x-edgegen-node", "x-edgegen-tier",
                            "x-edgegen-route"}


@dataclass(frozen=True)
class ForwardConfig:
    max_attempts: int = 3           # first try + retries, each on a different endpoint
    connect_timeout_s: float = 2.0
    read_timeout_s: float = 120.0   # between two bytes, including the wait for headers
    max_connections: int = 512
    keepalive_expiry_s: float = 30.0
    retry_after_s: int = 2          # what a 503 tells clients when nothing can serve


@dataclass
class _Failure:
    endpoint: Endpoint
    why: str
    response: Response | None = None   # the upstream's own 5xx/429, passed on if it is the last


class Forwarder:
    def __init__(self, table: EndpointTable, metrics: RouterMetrics,
                 config: ForwardConfig = ForwardConfig(),
                 transport: httpx.AsyncBaseTransport | None = None):
        self.table = table
        self.metrics = metrics
        self.config = config
        self.client = httpx.AsyncClient(
            timeout=httpx.Timeout(config.read_timeout_s, connect=config.connect_timeout_s),
            limits=httpx.Limits(max_connections=config.max_connections,
                                max_keepalive_connections=config.max_connections,
                                keepalive_expiry=config.keepalive_expiry_s),
            transport=transport, follow_redirects=False)

    async def aclose(self) -> None:
        await self.client.aclose()

    async def forward(self, path: str, body: bytes, headers: dict[str, str],
                      hints: RequestHints) -> Response:
        """One client request: choose, send, retry elsewhere if allowed; the client's answer."""
        table = self.table
        table.budget.request(table.clock())
        tried: set[str] = set()
        last: _Failure | None = None
        for attempt in range(self.config.max_attempts):
            decision = table.choose(hints, tried)
            if decision.endpoint is None:
                break
            if attempt:
                if not table.budget.try_retry(table.clock()):
                    log.warning("retry budget spent", extra={"path": path})
                    break
                self.metrics.retries.inc()
            tried.add(decision.endpoint.id)
            result = await self._attempt(decision, path, body, headers)
            if isinstance(result, Response):
                if decision.endpoint.tier == "central":
                    self.metrics.fallbacks.inc()
                return result
            last = result
            log.info("upstream attempt failed", extra={
                "endpoint": result.endpoint.id, "why": result.why, "attempt": attempt + 1})
        return self._give_up(last, hints)

    def _give_up(self, last: _Failure | None, hints: RequestHints) -> Response:
        if last is not None and last.response is not None:
            self.metrics.requests.labels(last.endpoint.tier, "upstream_error").inc()
            return last.response
        if last is None:
            msg = f"no healthy endpoint serves model {hints.model!r} right now"
            outcome, tier = "no_endpoint", "none"
        else:
            msg = f"every endpoint tried failed; last: {last.endpoint.node}: {last.why}"
            outcome, tier = "upstream_error", last.endpoint.tier
        self.metrics.requests.labels(tier, outcome).inc()
        return JSONResponse(error_body(msg, "service_unavailable", "no_endpoint"), 503,
                            headers={"retry-after": str(self.config.retry_after_s),
                                     "x-edgegen-route": "none:no-endpoint"})

    async def _attempt(self, decision: Decision, path: str, body: bytes,
                       headers: dict[str, str]) -> Response | _Failure:
        ep = decision.endpoint
        stats, clock = self.table.stats, self.table.clock
        stats.started(ep.id, probe=decision.probe)
        start = clock()
        out_headers = {k: v for k, v in headers.items() if k in FORWARDED_REQUEST_HEADERS}
        request = self.client.build_request("POST", ep.url + path, content=body,
                                            headers=out_headers)
        handed_over = False
        try:
            try:
                upstream = await self.client.send(request, stream=True)
            except httpx.TransportError as exc:
                return self._failed(ep, start, f"{type(exc).__name__}: {exc}")
            ttfb_ms = (clock() - start) * 1000
            reply_headers = _reply_headers(upstream.headers, ep, decision.reason)
            status = upstream.status_code
            is_sse = upstream.headers.get("content-type", "").startswith("text/event-stream")
            if status >= 500 or status == 429 or not is_sse:
                try:
                    raw = b"".join([c async for c in upstream.aiter_raw()])
                except httpx.TransportError as exc:
                    return self._failed(ep, start, f"{type(exc).__name__} reading body: {exc}")
                finally:
                    await upstream.aclose()
                response = Response(raw, status, headers=reply_headers)
                self._observe(ep, start)
                if status == 429:
                    stats.answered(ep.id)
                    return _Failure(ep, "429 busy", response)
                if status >= 500:
                    self._failed(ep, start, f"status {status}")
                    return _Failure(ep, f"status {status}", response)
                stats.succeeded(ep.id, ttfb_ms)
                outcome = "ok" if status < 400 else "client_error"
                self.metrics.requests.labels(ep.tier, outcome).inc()
                return response
            chunks = upstream.aiter_raw()
            try:
                first = await chunks.__anext__()
            except (httpx.TransportError, StopAsyncIteration) as exc:
                await upstream.aclose()
                return self._failed(ep, start, f"stream ended before its first byte: {exc!r}")
            stats.succeeded(ep.id, ttfb_ms)
            handed_over = True
            return _SSEPassthrough(
                _events(first, chunks, ep, self._stream_broken),
                on_close=lambda done: self._stream_closed(ep, start, upstream, done),
                status_code=status, headers=reply_headers)
        finally:
            if not handed_over:
                stats.finished(ep.id)

    def _failed(self, ep: Endpoint, start: float, why: str) -> _Failure:
        self._observe(ep, start)
        if self.table.stats.failed(ep.id, self.table.clock(), self.table.tier_ids(ep.tier)):
            log.warning("endpoint ejected", extra={"endpoint": ep.id, "why": why})
        return _Failure(ep, why)

    def _observe(self, ep: Endpoint, start: float) -> None:
        self.metrics.upstream_duration.labels(ep.id).observe(self.table.clock() - start)

    def _stream_broken(self, ep: Endpoint, exc: BaseException) -> None:
        log.warning("upstream stream broke", extra={"endpoint": ep.id, "error": repr(exc)})
        self.table.stats.failed(ep.id, self.table.clock(), self.table.tier_ids(ep.tier))
        self.metrics.requests.labels(ep.tier, "stream_broken").inc()

    async def _stream_closed(self, ep: Endpoint, start: float, upstream: httpx.Response,
                             completed: bool | None) -> None:
        """completed: True when upstream finished, False when it broke, None: client left."""
        await upstream.aclose()
        self.table.stats.finished(ep.id)
        self._observe(ep, start)
        if completed:
            self.metrics.requests.labels(ep.tier, "ok").inc()
        elif completed is None:
            self.metrics.requests.labels(ep.tier, "cancelled").inc()


def _reply_headers(upstream: httpx.Headers, ep: Endpoint, route: str) -> dict[str, str]:
    out = {k: v for k, v in upstream.items() if k.lower() not in DROPPED_RESPONSE_HEADERS}
    out.update({"x-edgegen-node": ep.node, "x-edgegen-tier": ep.tier, "x-edgegen-route": route})
    return out


_EVENT_ENDS = (b"\r\n\r\n", b"\n\n", b"\r\r")


def _last_event_end(buf: bytes) -> int:
    """Index just past the last complete SSE event in ``buf`` (0 if none is complete)."""
    best = 0
    for sep in _EVENT_ENDS:
        i = buf.rfind(sep)
        if i >= 0:
            best = max(best, i + len(sep))
    return best


async def _events(first: bytes, rest: AsyncIterator[bytes], ep: Endpoint,
                  on_break: Callable[[Endpoint, BaseException], None]) -> AsyncIterator[bytes]:
    buf = first
    try:
        while True:
            cut = _last_event_end(buf)
            if cut:
                yield buf[:cut]
                buf = buf[cut:]
            try:
                buf += await rest.__anext__()
            except StopAsyncIteration:
                break
    except httpx.TransportError as exc:
        on_break(ep, exc)
        yield sse_error_event(f"the stream from {ep.node} broke: {type(exc).__name__}")
        raise _Broken from None
    if buf:
        yield buf


class _Broken(Exception):
    """Internal: the upstream stream broke (its error event has been sent)."""


class _SSEPassthrough(StreamingResponse):
    """A streaming response that also watches for the client leaving, whatever the server's
    ASGI version, and always runs ``on_close(completed)`` to release the upstream."""

    def __init__(self, content, on_close: Callable[[bool | None], Awaitable[None]], **kw):
        super().__init__(content, **kw)
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        completed: bool | None = None

        async def stream(cancel: anyio.CancelScope) -> None:
            nonlocal completed
            try:
                await self.stream_response(send)
                completed = True
            except _Broken:
                completed = False
                await send({"type": "http.response.body", "body": b"", "more_body": False})
            except OSError:
                pass  # the client went away while we wrote to it
            cancel.cancel()

        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(stream, tg.cancel_scope)
                await self.listen_for_disconnect(receive)
                tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()
                await self._on_close(completed)
