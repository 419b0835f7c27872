"""The router's live endpoint table: Consul's endpoints joined with what the router learned.

Owns the mutable parts (stats, retry budget, random source, clock) and hands the pure policy a
snapshot for each decision. Endpoints come from ``sources``: callables returning the current
endpoints (the discovery watchers' ``.endpoints``, or a fixed list in tests).
"""

from __future__ import annotations

import random
import time
from typing import Callable, Iterable

from cloud_router.endpoints import Endpoint
from cloud_router.policy import Decision, PolicyConfig, RequestHints, choose_endpoint
from cloud_router.stats import EjectionConfig, RetryBudget, StatsBook

EndpointSource = Callable[[], Iterable[Endpoint]]


class EndpointTable:
    def __init__(self, sources: list[EndpointSource], *, policy: PolicyConfig = PolicyConfig(),
                 ejection: EjectionConfig = EjectionConfig(),
                 budget: RetryBudget | None = None, rng: random.Random | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.sources = sources
        self.policy = policy
        self.stats = StatsBook(ejection)
        self.budget = budget or RetryBudget()
        self.rng = rng or random.Random()
        self.clock = clock
        self.seen_models: set[str] = set()  # every model the table has held since start

    def endpoints(self) -> list[Endpoint]:
        out: dict[str, Endpoint] = {}
        for source in self.sources:
            for e in source():
                out[e.id] = e
        self.seen_models.update(e.model for e in out.values() if e.model)
        return list(out.values())

    def models(self) -> list[str]:
        """Models served by an endpoint in the table now."""
        return sorted({e.model for e in self.endpoints() if e.model})

    def known_model(self, model: str) -> bool:
        """Served now or earlier: a model whose endpoints all went away is unavailable (503),
        not unknown (404)."""
        self.endpoints()
        return model in self.seen_models

    def choose(self, hints: RequestHints, exclude: set[str] | frozenset = frozenset()) -> Decision:
        endpoints = self.endpoints()
        self.stats.forget_except({e.id for e in endpoints})
        return choose_endpoint(endpoints, hints, self.stats.snapshot(), self.rng, self.clock(),
                               self.policy, exclude)

    def tier_ids(self, tier: str) -> list[str]:
        return [e.id for e in self.endpoints() if e.tier == tier]

    def rows(self) -> list[dict]:
        """The table as `/edgegen/v1/endpoints` shows it."""
        now = self.clock()
        rows = []
        for e in sorted(self.endpoints(), key=lambda e: (e.tier != "edge", e.region, e.id)):
            s = self.stats.get(e.id)
            rows.append({
                "id": e.id, "node": e.node, "tier": e.tier, "url": e.url, "model": e.model,
                "digest": e.digest, "region": e.region, "zone": e.zone, "lat": e.lat,
                "lon": e.lon, "max_concurrency": e.max_concurrency, "rtt_ms": e.rtt_ms,
                "state": s.state(now), "inflight": s.inflight,
                "ewma_ms": None if s.ewma_ms is None else round(s.ewma_ms, 3),
                "consecutive_failures": s.consecutive_failures, "ejections": s.ejections,
                "ejected_for_s": None if s.ejected_until is None
                else round(max(0.0, s.ejected_until - now), 3),
                "requests": s.requests, "failures": s.failures,
            })
        return rows
