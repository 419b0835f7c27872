"""The router's live endpoint table: the fleet from discovery joined with what the router
learned about each endpoint.

Owns the mutable parts (the current fleet, stats, retry budget, random source, clock) and hands
the pure policy snapshots for each decision. Endpoints come from ``sources`` (the discovery
watchers, or a list in tests); the fleet is rebuilt only when a source's ``generation`` has
moved, and that is also when the stats of endpoints that left are dropped.

A ``gate`` (the identity verifier, when the router has a fleet key) decides which endpoints
may be sent requests; the others stay in the table (and its rows) but are never candidates,
and a route explanation lists them as skipped with the gate's reason. The fleet is rebuilt
when the gate's ``generation`` moves too.
"""

from __future__ import annotations

import random
import time
from dataclasses import replace
from operator import attrgetter
from typing import Callable, Protocol, Sequence

from cloud_router.affinity import AffinityTable
from cloud_router.endpoints import Endpoint
from cloud_router.fleet import Fleet
from cloud_router.policy import Decision, PolicyConfig, RequestHints, choose_endpoint
from cloud_router.stats import EjectionConfig, RetryBudget, StatsBook

_generation = attrgetter("generation")   # read twice per forwarded request


class EndpointSource(Protocol):
    """Where endpoints come from. ``generation`` changes whenever ``endpoints`` does (set the
    endpoints first, then move the generation)."""

    @property
    def generation(self) -> int: ...

    @property
    def endpoints(self) -> list[Endpoint]: ...


class EndpointGate(Protocol):
    """Which endpoints may be sent requests. ``generation`` moves whenever ``admit`` may
    answer differently."""

    @property
    def generation(self) -> int: ...

    def admit(self, endpoint: Endpoint) -> str | None:
        """None when requests may go to ``endpoint``, else why not."""

    def describe(self, endpoint: Endpoint) -> dict:
        """Extra columns for the endpoint's row."""


class EndpointTable:
    def __init__(self, sources: Sequence[EndpointSource], *,
                 policy: PolicyConfig = PolicyConfig(),
                 ejection: EjectionConfig = EjectionConfig(),
                 budget: RetryBudget | None = None, rng: random.Random | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 gate: EndpointGate | None = None):
        self.sources = tuple(sources)
        self.gate = gate
        self.policy = policy
        self.stats = StatsBook(ejection)
        self.budget = budget or RetryBudget()
        self.rng = rng or random.Random()
        self.clock = clock
        self.affinity = AffinityTable()   # prompt prefix -> the endpoint last sent it
        self._fleet = Fleet.of(())
        self._endpoint_ids: set[str] = set()
        self._generations: tuple[int, ...] | None = None

    @property
    def fleet(self) -> Fleet:
        """The current fleet, rebuilt here only when a source reports a change."""
        generations = tuple(map(_generation, self.sources))
        if self.gate is not None:
            generations += (self.gate.generation,)
        if generations != self._generations:
            # Generations are read before endpoints: a change that lands in between is seen
            # now and rebuilt once more on the next read.
            self._generations = generations
            self._fleet = Fleet.of((e for s in self.sources for e in s.endpoints),
                                   self._fleet.known_models,
                                   self.gate.admit if self.gate is not None else None)
            self.stats.forget_except(self._fleet.by_id.keys())
            for gone in self._endpoint_ids - self._fleet.by_id.keys():
                self.affinity.forget(gone)
            self._endpoint_ids = set(self._fleet.by_id)
        return self._fleet

    def set_gate(self, gate: EndpointGate | None) -> None:
        """Admit only the endpoints ``gate`` admits from now on."""
        self.gate = gate
        self._generations = None

    def models(self) -> list[str]:
        """Models served by an endpoint in the fleet now."""
        return list(self.fleet.models)

    def known_model(self, model: str) -> bool:
        """Served now or earlier: a model whose endpoints all went away is unavailable (503),
        not unknown (404)."""
        return model in self.fleet.known_models

    def choose(self, hints: RequestHints, exclude: set[str] | frozenset = frozenset(),
               explain: bool = False) -> Decision:
        fleet = self.fleet
        affinity = self.affinity.lookup(hints.prefix) if hints.prefix else None
        decision = choose_endpoint(fleet.serving.get(hints.model, ()), hints,
                                   self.stats.snapshot(), self.rng, self.clock(), self.policy,
                                   exclude, affinity, explain)
        withheld = fleet.withheld.get(hints.model)
        if withheld:
            decision = replace(decision, skipped={**withheld, **decision.skipped})
        return decision

    def tier_ids(self, tier: str) -> tuple[str, ...]:
        return self.fleet.tier_ids.get(tier, ())

    def rows(self) -> list[dict]:
        """The table as `/edgegen/v1/endpoints` shows it."""
        now = self.clock()
        rows = []
        for e in sorted(self.fleet.endpoints, key=lambda e: (e.tier != "edge", e.region, e.id)):
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
                "queued": s.queued(now, self.policy.report_ttl_s, e.max_concurrency),
                "running": s.running,
                "cache_usage": s.cache_usage,
                **(self.gate.describe(e) if self.gate is not None else {}),
            })
        return rows
