"""Asking endpoints to prove the fleet key: the one place the identity protocol does I/O.

``IdentityVerifier`` follows the endpoint sources (the discovery watchers), checks each
endpoint when ``identity.due`` says so (a new endpoint or a changed address at once), keeps
each endpoint's ``IdentityState`` and is the endpoint table's gate: the table admits an
endpoint to routing only when ``identity.admission`` allows it. The decisions are
``cloud_router.identity``'s; this module only sends the requests, draws the nonces and reads
the clock.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from typing import Callable, Sequence

import httpx
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import GaugeMetricFamily

from cloud_router.endpoints import Endpoint
from cloud_router.identity import (
    IDENTITY_PATH,
    STATES,
    Answer,
    IdentityConfig,
    IdentityState,
    Verdict,
    admission,
    after,
    current,
    due,
    judge,
)
from cloud_router.metrics import counters_registry
from cloud_router.table import EndpointSource

log = logging.getLogger(__name__)
MAX_CONCURRENT_CHECKS = 16
MAX_ANSWER_BYTES = 4096


class IdentityVerifier:
    def __init__(self, sources: Sequence[EndpointSource], key: bytes,
                 config: IdentityConfig = IdentityConfig(), *,
                 transport: httpx.AsyncBaseTransport | None = None,
                 clock: Callable[[], float] = time.monotonic, tick_s: float = 0.25):
        if not key:
            raise ValueError("a fleet key is required")
        self.sources = tuple(sources)
        self.config = config
        self.clock = clock
        self.tick_s = tick_s
        self._key = key
        self._transport = transport
        self._states: dict[str, IdentityState] = {}
        self.generation = 0        # moves whenever an endpoint's admission may have changed
        self.checks: Counter | None = None

    # ---- the table's gate -------------------------------------------------------------------

    def admit(self, endpoint: Endpoint) -> str | None:
        """None when requests may go to ``endpoint``, else why not."""
        return admission(current(self._states.get(endpoint.id), endpoint))

    def describe(self, endpoint: Endpoint) -> dict:
        """The endpoint's identity for `/edgegen/v1/endpoints`."""
        s = current(self._states.get(endpoint.id), endpoint)
        now = self.clock()
        return {"identity": s.state, "identity_reason": s.reason,
                "identity_checked_s_ago": None if s.checked_at is None
                else round(now - s.checked_at, 3)}

    def register_metrics(self, registry: CollectorRegistry) -> None:
        """edgegen_router_endpoint_identity{tier,state} and
        edgegen_router_identity_checks_total{outcome} in the router's registry."""
        self.checks = Counter("edgegen_router_identity_checks",
                              "Identity checks of endpoints, by outcome (verified, rejected, "
                              "unreachable).", ["outcome"],
                              registry=counters_registry(registry))
        registry.register(_IdentityGauge(self))

    # ---- checking ---------------------------------------------------------------------------

    def endpoints(self) -> list[Endpoint]:
        by_id: dict[str, Endpoint] = {}
        for source in self.sources:
            for e in source.endpoints:
                by_id[e.id] = e
        return list(by_id.values())

    async def check(self, client: httpx.AsyncClient, endpoint: Endpoint) -> Verdict:
        """One identity request to ``endpoint``, judged."""
        nonce = secrets.token_hex(32)
        try:
            async with client.stream("GET", endpoint.url + IDENTITY_PATH,
                                     params={"nonce": nonce},
                                     timeout=self.config.timeout_s) as r:
                raw = b""
                async for chunk in r.aiter_bytes():   # an impostor's answer is read bounded
                    raw += chunk
                    if len(raw) > MAX_ANSWER_BYTES:
                        break
            try:
                body = json.loads(raw) if len(raw) <= MAX_ANSWER_BYTES else None
            except (ValueError, UnicodeDecodeError):
                body = None
            answer = Answer(r.status_code, body)
        except httpx.HTTPError as exc:
            answer = Answer(None, error=f"{type(exc).__name__}: {exc}".rstrip(": "))
        return judge(self._key, nonce, endpoint, answer)

    async def check_due(self, client: httpx.AsyncClient) -> int:
        """Check every endpoint that is due now; returns how many were checked."""
        endpoints = self.endpoints()
        present = {e.id for e in endpoints}
        for gone in set(self._states) - present:
            del self._states[gone]
        now = self.clock()
        todo = []
        for e in endpoints:
            state = current(self._states.get(e.id), e)
            if state is not self._states.get(e.id):
                self._states[e.id] = state      # new, or its address changed
                self.generation += 1
            if due(state, now, self.config):
                todo.append(e)
        if not todo:
            return 0
        gate = asyncio.Semaphore(MAX_CONCURRENT_CHECKS)

        async def one(e: Endpoint) -> tuple[Endpoint, Verdict]:
            async with gate:
                return e, await self.check(client, e)

        for e, verdict in await asyncio.gather(*(one(e) for e in todo)):
            self._record(e, verdict)
        return len(todo)

    def _record(self, e: Endpoint, verdict: Verdict) -> None:
        before = current(self._states.get(e.id), e)
        if before.url != e.url:
            return   # the address changed while it was checked: check the new one
        state = after(before, verdict, self.clock())
        self._states[e.id] = state
        if self.checks is not None:
            self.checks.labels(verdict.outcome).inc()
        if admission(state) != admission(before):
            self.generation += 1
        if state.state != before.state:
            level = logging.INFO if state.state == "verified" else logging.WARNING
            log.log(level, "endpoint identity %s", state.state, extra={
                "endpoint": e.id, "node": e.node, "url": e.url, "reason": state.reason})

    def _client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(transport=self._transport, trust_env=False,
                                 follow_redirects=False)

    async def check_due_once(self) -> int:
        """One round of checks (at start, so that the first table already knows)."""
        async with self._client() as client:
            return await self.check_due(client)

    async def run(self) -> None:
        """Check endpoints as they become due, until cancelled."""
        async with self._client() as client:
            while True:
                try:
                    await self.check_due(client)
                except Exception:  # noqa: BLE001 - one bad round must not stop verification
                    log.exception("identity checks failed")
                await asyncio.sleep(self.tick_s)


class _IdentityGauge:
    """edgegen_router_endpoint_identity{tier,state}, computed at scrape time."""

    def __init__(self, verifier: IdentityVerifier):
        self._verifier = verifier

    def describe(self):
        return []

    def collect(self):
        g = GaugeMetricFamily("edgegen_router_endpoint_identity",
                              "Endpoints by tier and identity state (verified, unverified, "
                              "failed); only verified endpoints are routed to.",
                              labels=["tier", "state"])
        counts = {(t, s): 0 for t in ("edge", "central") for s in STATES}
        for e in self._verifier.endpoints():
            key = (e.tier, self._verifier.describe(e)["identity"])
            counts[key] = counts.get(key, 0) + 1
        for (tier, state), n in sorted(counts.items()):
            g.add_metric([tier, state], n)
        yield g
