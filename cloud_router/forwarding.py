"""Sending a request to the chosen endpoint, and trying another one when that fails.

The one module that sends requests to upstream agents (through ``cloud_router.upstream``'s
pool of keep-alive connections; ``streams`` reads their SSE answers). It says what happened
and builds no HTTP response; the proxy maps the outcome to one:

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
- A 2xx-4xx answer that is not a JSON object (or a stream) is no success: it is retried
  like a 5xx and never passed on.
- SSE passes through event by event as it arrives (a partial event waits for its end, so a
  stream that breaks never leaves half an event behind). A chat stream that breaks after the
  first byte is continued on another endpoint (``cloud_router.resume``); one that cannot be
  ends with an OpenAI-shaped error event. Closing a stream closes the upstream response,
  which closes the upstream connection and so cancels the generation when the client left.
- An endpoint that refuses the connection, or whose stream breaks after the first byte, is
  ejected at once (its process is gone; ``StatsBook.failed(hard=True)``), not after the
  usual run of failures: the retry and the next requests go elsewhere without waiting for
  Consul's health check.
- Every forwarded request is counted once in ``edgegen_router_requests_total`` here, when its
  outcome is known (a stream's when it ends).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cloud_router.affinity import LOAD_FORMAT_HEADER, LOAD_HEADER, parse_load_report
from cloud_router.endpoints import Endpoint
from cloud_router.metrics import RouterMetrics
from cloud_router.policy import Decision, RequestHints
from cloud_router.resume import RESUME_HEADER, Transcript, resumable
from cloud_router.streams import TRANSPORT_ERRORS, UpstreamStream
from cloud_router.table import EndpointTable
from cloud_router.upstream import ConnectFailed, UpstreamPool, UpstreamResponse

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
    max_migrations: int = 2         # times one stream may move on after its edge broke


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


def _json_object(headers: Mapping[str, str], body: bytes) -> bool:
    """An agent's answer as it must look: ``application/json``, an object. Checked by its
    ends, not parsed: parsing every answer would cost more than the rest of the forwarding."""
    body = body.strip()
    return (headers.get("content-type", "").startswith("application/json")
            and body[:1] == b"{" and body[-1:] == b"}")


class Forwarder:
    def __init__(self, table: EndpointTable, metrics: RouterMetrics,
                 config: ForwardConfig = ForwardConfig()):
        self.table = table
        self.metrics = metrics
        self.config = config
        self._pool: UpstreamPool | None = None

    @property
    def pool(self) -> UpstreamPool:
        """The connection pool, made on first use (inside the server's event loop)."""
        if self._pool is None:
            c = self.config
            self._pool = UpstreamPool(connect_timeout_s=c.connect_timeout_s,
                                      read_timeout_s=c.read_timeout_s,
                                      keepalive_expiry_s=c.keepalive_expiry_s,
                                      max_connections=c.max_connections)
        return self._pool

    async def aclose(self) -> None:
        if self._pool is not None:
            await self._pool.aclose()
            self._pool = None

    async def forward(self, path: str, body: bytes, headers: dict[str, str],
                      hints: RequestHints, payload: Any = None) -> Forwarded | Refused:
        """One client request: choose, send, retry elsewhere if allowed. ``payload``: the
        body's JSON, which says whether a broken stream may be continued elsewhere."""
        table = self.table
        table.budget.request(table.clock())
        tried: set[str] = set()
        last: _Failure | None = None
        transcript = Transcript(payload) if resumable(path, payload) else None

        async def resume(t: Transcript) -> UpstreamStream | None:
            return await self._continue(path, headers, hints, tried, t)

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
            result = await self._attempt(decision, path, body, headers, transcript, resume)
            if isinstance(result, Forwarded):
                if decision.endpoint.tier == "central":
                    self.metrics.fallbacks.inc()
                if result.stream is None:   # a stream is counted when it ends
                    self.metrics.count(result.endpoint.tier,
                                       "ok" if result.status < 400 else "client_error")
                if result.status < 400 and hints.prefix:   # it now holds this prompt
                    table.affinity.record(hints.prefix, result.endpoint.id)
                return result
            last = result
            log.info("upstream attempt failed", extra={
                "endpoint": result.endpoint.id, "why": result.why, "attempt": attempt + 1})
        return self._give_up(last, hints)

    def _give_up(self, last: _Failure | None, hints: RequestHints) -> Forwarded | Refused:
        if last is not None and last.answer is not None:
            self.metrics.count(last.endpoint.tier, "upstream_error")
            return last.answer
        if last is None:
            msg = f"no healthy endpoint serves model {hints.model!r} right now"
            tier, outcome = "none", "no_endpoint"
        else:
            msg = f"every endpoint tried failed; last: {last.endpoint.node}: {last.why}"
            tier, outcome = last.endpoint.tier, "upstream_error"
        self.metrics.count(tier, outcome)
        return Refused(msg, self.config.retry_after_s)

    async def _continue(self, path: str, headers: dict[str, str], hints: RequestHints,
                        tried: set[str], transcript: Transcript) -> UpstreamStream | None:
        """A stream that continues ``transcript`` on an endpoint not tried yet, or None when
        none can (no endpoint, the retry budget or the migration limit spent)."""
        table = self.table
        payload, extra = transcript.continuation()
        body, headers = json.dumps(payload).encode(), {**headers, **extra}
        while transcript.migrations < self.config.max_migrations:
            decision = table.choose(hints, tried)
            if decision.endpoint is None or not table.budget.try_retry(table.clock()):
                return None
            transcript.migrations += 1
            tried.add(decision.endpoint.id)
            result = await self._attempt(decision, path, body, headers)
            if isinstance(result, Forwarded) and result.stream is not None:
                self.metrics.resumed.inc()
                log.info("stream continued", extra={"endpoint": decision.endpoint.id,
                                                    "migration": transcript.migrations})
                return result.stream
            log.info("stream continuation failed", extra={
                "endpoint": decision.endpoint.id,
                "why": getattr(result, "why", None) or f"status {result.status}"})
        return None

    async def _attempt(self, decision: Decision, path: str, body: bytes,
                       headers: dict[str, str], transcript: Transcript | None = None,
                       resume=None) -> Forwarded | _Failure:
        ep = decision.endpoint
        stats, clock = self.table.stats, self.table.clock
        stats.started(ep.id, probe=decision.probe)
        start = clock()
        out_headers = [(k, v) for k, v in headers.items()
                       if k in FORWARDED_REQUEST_HEADERS or k == RESUME_HEADER]
        out_headers.append((LOAD_FORMAT_HEADER, "TEXT"))   # the agent says how busy it is
        handed_over = False
        try:
            try:
                upstream = await self.pool.request(ep.address, ep.port, path, out_headers, body)
            except ConnectFailed as exc:   # refused, unreachable: gone
                return self._failed(ep, start, str(exc), hard=True)
            except TRANSPORT_ERRORS as exc:
                return self._failed(ep, start, f"{type(exc).__name__}: {exc}")
            ttfb_ms = (clock() - start) * 1000
            status = upstream.status
            reply_headers = upstream.headers
            self._load_report(ep, reply_headers.pop(LOAD_HEADER, None))
            is_sse = reply_headers.get("content-type", "").startswith("text/event-stream")
            if status >= 500 or status == 429 or not is_sse:
                try:
                    raw = await upstream.read()
                except TRANSPORT_ERRORS as exc:
                    return self._failed(ep, start, f"{type(exc).__name__} reading body: {exc}")
                finally:
                    upstream.release()
                answer = Forwarded(ep, decision.reason, status, reply_headers, body=raw)
                self._observe(ep, start)
                if status == 429:
                    stats.answered(ep.id)
                    return _Failure(ep, "429 busy", answer)
                if status >= 500:
                    self._failed(ep, start, f"status {status}")
                    return _Failure(ep, f"status {status}", answer)
                if not _json_object(reply_headers, raw):   # garbage is no success
                    self.metrics.invalid_answers.inc()
                    return self._failed(ep, start, f"status {status} with a body that is not "
                                        "a JSON object")
                stats.succeeded(ep.id, ttfb_ms)
                return answer
            chunks = upstream.chunks()
            try:
                first = await chunks.__anext__()
            except (*TRANSPORT_ERRORS, StopAsyncIteration) as exc:
                upstream.close()
                return self._failed(ep, start, f"stream ended before its first byte: {exc!r}")
            stats.succeeded(ep.id, ttfb_ms)
            handed_over = True
            stream = UpstreamStream(
                ep, first, chunks, on_break=self._stream_broken, on_lost=self._stream_lost,
                on_close=lambda outcome: self._stream_closed(ep, start, upstream, outcome),
                transcript=transcript, resume=resume)
            return Forwarded(ep, decision.reason, status, reply_headers, stream=stream)
        finally:
            if not handed_over:
                stats.finished(ep.id)

    def _load_report(self, ep: Endpoint, header: str | None) -> None:
        if header is None:
            return
        try:
            r = parse_load_report(header)
        except ValueError as exc:   # a report that cannot be true steers nothing
            self.metrics.invalid_load_reports.inc()
            log.info("load report refused", extra={"endpoint": ep.id, "why": str(exc)})
            return
        self.table.stats.reported(ep.id, r.waiting, r.running, r.cache_usage,
                                  self.table.clock())

    def _failed(self, ep: Endpoint, start: float, why: str, hard: bool = False) -> _Failure:
        self._observe(ep, start)
        if hard:   # its process is gone, and its cache with it
            self.table.affinity.forget(ep.id)
        if self.table.stats.failed(ep.id, self.table.clock(), self.table.tier_ids(ep.tier),
                                   hard=hard):
            log.warning("endpoint ejected", extra={"endpoint": ep.id, "why": why})
        return _Failure(ep, why)

    def _observe(self, ep: Endpoint, start: float) -> None:
        self.metrics.upstream_seconds(ep.id, self.table.clock() - start)

    def _stream_broken(self, ep: Endpoint, exc: BaseException) -> None:
        """An endpoint whose stream broke is ejected at once: its process is gone."""
        log.warning("upstream stream broke", extra={"endpoint": ep.id, "error": repr(exc)})
        self.table.stats.failed(ep.id, self.table.clock(), self.table.tier_ids(ep.tier),
                                hard=True)
        self.table.affinity.forget(ep.id)

    def _stream_lost(self, ep: Endpoint) -> None:
        """A stream that cannot go on: counted at once, before the client sees the error
        event."""
        self.metrics.count(ep.tier, "stream_broken")

    async def _stream_closed(self, ep: Endpoint, start: float,
                             upstream: UpstreamResponse, outcome: str | None) -> None:
        """outcome: ok | cancelled (the client left), None when already counted (broke).
        Only a stream read to its end gives its connection back to the pool; closing one
        mid-way closes the connection, which is what cancels the generation upstream."""
        if outcome == "ok":
            upstream.release()
        else:
            upstream.close()
        self.table.stats.finished(ep.id)
        self._observe(ep, start)
        if outcome is not None:
            self.metrics.count(ep.tier, outcome)
