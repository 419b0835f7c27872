"""Sending a request to the chosen endpoint, and trying another one when that fails.

The one module that talks to upstream agents (httpx, one pooled keep-alive client). It says
what happened and builds no HTTP response; the app maps the outcome to one:

    Forwarded   an upstream's answer, to pass on as it is: a whole body, or an SSE stream
                whose first bytes have arrived (``UpstreamStream``)
    Refused     no endpoint could take the request: none serves it now, or every try failed
                without an answer worth passing on

Rules:

- Retry on connect errors, timeouts and broken connections before the response headers, and on
  5xx and 429 answers, **only while nothing has been sent to the client** and each time on an
  endpoint this request has not tried, within the table's retry budget. A non-streaming answer
  is read whole before it is returned, and a stream's first chunk is read before it is, so
  both stay retryable up to that point. When every try failed, the last upstream answer (5xx
  or 429) is passed on if there was one.
- SSE passes through event by event as it arrives (a partial event waits for its end, so a
  stream that breaks never leaves half an event behind). A stream that breaks after the first
  byte ends with an OpenAI-shaped error event. Closing a stream closes the upstream response,
  which closes the upstream connection and so cancels the generation when the client left.
- Every forwarded request is counted once in ``edgegen_router_requests_total`` here, when its
  outcome is known (a stream's when it ends).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import AsyncIterator, Awaitable, Callable, Mapping

import httpx

from cloud_router.endpoints import Endpoint
from cloud_router.metrics import RouterMetrics
from cloud_router.policy import Decision, RequestHints
from cloud_router.protocol import sse_error_event
from cloud_router.table import EndpointTable

log = logging.getLogger(__name__)

FORWARDED_REQUEST_HEADERS = ("content-type", "accept", "user-agent", "x-request-id",
                             "traceparent", "tracestate")
NO_ENDPOINT_ROUTE = "none:no-endpoint"


@dataclass(frozen=True)
class ForwardConfig:
    max_attempts: int = 3           # first try + retries, each on a different endpoint
    connect_timeout_s: float = 2.0
    read_timeout_s: float = 120.0   # between two bytes, including the wait for headers
    max_connections: int = 512
    keepalive_expiry_s: float = 30.0
    retry_after_s: int = 2          # when to try again, if nothing can serve


@dataclass(frozen=True)
class Forwarded:
    """An upstream's answer to pass on as it is: ``body`` holds it whole, unless ``stream``
    is set (an SSE stream, whose sender must close it)."""

    endpoint: Endpoint
    route: str                    # why this endpoint (the policy's reason)
    status: int
    headers: Mapping[str, str]    # the upstream's response headers
    body: bytes = b""
    stream: UpstreamStream | None = None


@dataclass(frozen=True)
class Refused:
    """No endpoint could take the request; the client may try again after ``retry_after_s``."""

    message: str
    retry_after_s: int
    route: str = NO_ENDPOINT_ROUTE


@dataclass(frozen=True)
class _Failure:
    endpoint: Endpoint
    why: str
    answer: Forwarded | None = None   # the upstream's own 5xx/429, passed on if it is the last


class UpstreamStream:
    """An upstream SSE answer on its way to the client, whole events at a time.

    The sender iterates ``events()`` and then calls ``close(delivered)`` exactly once, however
    the sending ended: that releases the upstream response and counts the outcome.
    """

    def __init__(self, endpoint: Endpoint, first: bytes, rest: AsyncIterator[bytes],
                 on_break: Callable[[BaseException], None],
                 on_close: Callable[[str | None], Awaitable[None]]):
        self.endpoint = endpoint
        self._first, self._rest = first, rest
        self._on_break, self._on_close = on_break, on_close
        self.broken = False

    async def events(self) -> AsyncIterator[bytes]:
        buf = self._first
        try:
            while True:
                cut = _last_event_end(buf)
                if cut:
                    yield buf[:cut]
                    buf = buf[cut:]
                try:
                    buf += await self._rest.__anext__()
                except StopAsyncIteration:
                    break
        except httpx.TransportError as exc:
            self.broken = True
            self._on_break(exc)
            yield sse_error_event(
                f"the stream from {self.endpoint.node} broke: {type(exc).__name__}")
            return
        if buf:
            yield buf

    async def close(self, delivered: bool) -> None:
        """``delivered``: the client got the stream to its end (False: it left)."""
        await self._on_close(None if self.broken else "ok" if delivered else "cancelled")


_EVENT_ENDS = (b"\r\n\r\n", b"\n\n", b"\r\r")


def _last_event_end(buf: bytes) -> int:
    """Index just past the last complete SSE event in ``buf`` (0 if none is complete)."""
    best = 0
    for sep in _EVENT_ENDS:
        i = buf.rfind(sep)
        if i >= 0:
            best = max(best, i + len(sep))
    return best


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
                      hints: RequestHints) -> Forwarded | Refused:
        """One client request: choose, send, retry elsewhere if allowed."""
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
            if isinstance(result, Forwarded):
                if decision.endpoint.tier == "central":
                    self.metrics.fallbacks.inc()
                return result
            last = result
            log.info("upstream attempt failed", extra={
                "endpoint": result.endpoint.id, "why": result.why, "attempt": attempt + 1})
        return self._give_up(last, hints)

    def _give_up(self, last: _Failure | None, hints: RequestHints) -> Forwarded | Refused:
        if last is not None and last.answer is not None:
            self.metrics.requests.labels(last.endpoint.tier, "upstream_error").inc()
            return last.answer
        if last is None:
            msg = f"no healthy endpoint serves model {hints.model!r} right now"
            tier, outcome = "none", "no_endpoint"
        else:
            msg = f"every endpoint tried failed; last: {last.endpoint.node}: {last.why}"
            tier, outcome = last.endpoint.tier, "upstream_error"
        self.metrics.requests.labels(tier, outcome).inc()
        return Refused(msg, self.config.retry_after_s)

    async def _attempt(self, decision: Decision, path: str, body: bytes,
                       headers: dict[str, str]) -> Forwarded | _Failure:
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
            status = upstream.status_code
            reply_headers = dict(upstream.headers.items())
            is_sse = upstream.headers.get("content-type", "").startswith("text/event-stream")
            if status >= 500 or status == 429 or not is_sse:
                try:
                    raw = b"".join([c async for c in upstream.aiter_raw()])
                except httpx.TransportError as exc:
                    return self._failed(ep, start, f"{type(exc).__name__} reading body: {exc}")
                finally:
                    await upstream.aclose()
                answer = Forwarded(ep, decision.reason, status, reply_headers, body=raw)
                self._observe(ep, start)
                if status == 429:
                    stats.answered(ep.id)
                    return _Failure(ep, "429 busy", answer)
                if status >= 500:
                    self._failed(ep, start, f"status {status}")
                    return _Failure(ep, f"status {status}", answer)
                stats.succeeded(ep.id, ttfb_ms)
                outcome = "ok" if status < 400 else "client_error"
                self.metrics.requests.labels(ep.tier, outcome).inc()
                return answer
            chunks = upstream.aiter_raw()
            try:
                first = await chunks.__anext__()
            except (httpx.TransportError, StopAsyncIteration) as exc:
                await upstream.aclose()
                return self._failed(ep, start, f"stream ended before its first byte: {exc!r}")
            stats.succeeded(ep.id, ttfb_ms)
            handed_over = True
            stream = UpstreamStream(
                ep, first, chunks, on_break=lambda exc: self._stream_broken(ep, exc),
                on_close=lambda outcome: self._stream_closed(ep, start, upstream, outcome))
            return Forwarded(ep, decision.reason, status, reply_headers, stream=stream)
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
        """Counted at once, before the client sees the error event."""
        log.warning("upstream stream broke", extra={"endpoint": ep.id, "error": repr(exc)})
        self.table.stats.failed(ep.id, self.table.clock(), self.table.tier_ids(ep.tier))
        self.metrics.requests.labels(ep.tier, "stream_broken").inc()

    async def _stream_closed(self, ep: Endpoint, start: float, upstream: httpx.Response,
                             outcome: str | None) -> None:
        """outcome: ok | cancelled (the client left), None when already counted (broke)."""
        await upstream.aclose()
        self.table.stats.finished(ep.id)
        self._observe(ep, start)
        if outcome is not None:
            self.metrics.requests.labels(ep.tier, outcome).inc()
