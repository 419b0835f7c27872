"""What the router has learned about each endpoint by talking to it, and its retry budget.

Mutable state, but no clock and no I/O: every method takes ``now`` (seconds, monotonic), so
the ejection and budget rules are tested on plain numbers. The forwarder feeds it outcomes;
the policy reads a snapshot of it (an immutable copy).

Outlier ejection follows Envoy's: ``consecutive_failures`` failures in a row, or a single hard
one (the connection refused, a stream cut: Envoy's local-origin failures with a threshold of
one), eject an endpoint for a backoff that doubles with each ejection (capped); when the
backoff is over, the next request that the policy sends there is the single probe, and its
outcome decides (success brings it back, failure ejects it again for longer). Ejections never take more than
``max_ejection_share`` of a tier out of service (at least one endpoint may always be ejected).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Collection, Mapping


@dataclass(frozen=True)
class EjectionConfig:
    consecutive_failures: int = 3
    base_backoff_s: float = 5.0
    max_backoff_s: float = 60.0
    max_ejection_share: float = 0.5


@dataclass(frozen=True)
class EndpointStats:
    """One endpoint's stats at one moment: a value, replaced (never changed) on each event."""

    inflight: int = 0
    ewma_ms: float | None = None        # latency to response headers, smoothed
    consecutive_failures: int = 0
    ejected_until: float | None = None  # set while ejected (including while being probed)
    probe_inflight: bool = False
    ejections: int = 0                  # total, for the table
    backoff_level: int = 0              # ejections since the last success; sets the backoff
    requests: int = 0
    failures: int = 0
    # the endpoint's own last load report (ORCA header), and when it came
    waiting: int = 0
    running: int = 0
    cache_usage: float = 0.0
    reported_at: float | None = None

    def queued(self, now: float, ttl_s: float, capacity: int = 0) -> int:
        """Requests that must wait for a slot, by the endpoint's report within ``ttl_s``: what
        it holds beyond its ``capacity`` (max_concurrency; 0: unknown, then what it said was
        waiting). A request waits in an agent's queue until its next step even when a slot is
        free, so "waiting" alone counts queues that are not there."""
        if self.reported_at is None or now - self.reported_at > ttl_s:
            return 0
        if capacity:
            return max(0, self.waiting + self.running - capacity)
        return self.waiting

    def state(self, now: float) -> str:
        """healthy | ejected | probing | probe-due."""
        if self.ejected_until is None:
            return "healthy"
        if self.probe_inflight:
            return "probing"
        return "ejected" if now < self.ejected_until else "probe-due"


_NEW = EndpointStats()


class StatsBook:
    """Per-endpoint stats keyed by endpoint id. Each event stores a new ``EndpointStats``, so
    a snapshot is a copy of the dict and later events cannot change what it holds."""

    def __init__(self, ejection: EjectionConfig = EjectionConfig(), ewma_alpha: float = 0.3):
        self.ejection = ejection
        self.alpha = ewma_alpha
        self._stats: dict[str, EndpointStats] = {}

    def get(self, endpoint_id: str) -> EndpointStats:
        return self._stats.get(endpoint_id, _NEW)

    def snapshot(self) -> Mapping[str, EndpointStats]:
        """Every endpoint's stats now, read-only; later events do not show in it."""
        return MappingProxyType(dict(self._stats))

    def forget_except(self, ids: Collection[str]) -> None:
        """Drop endpoints that left the fleet (keeps those with requests still in flight)."""
        for key in [k for k, s in self._stats.items() if k not in ids and s.inflight == 0]:
            del self._stats[key]

    def _copy(self, endpoint_id: str) -> tuple[EndpointStats, dict]:
        """The endpoint's stats before an event, and the fields of the copy stored in their
        place, for the event to set. Not ``dataclasses.replace``, which inspects the fields
        and runs ``__init__``: three events per forwarded request, and replace cost more than
        the policy's whole choice. (A frozen dataclass refuses attribute writes, not writes to
        its ``__dict__``; the copy is nobody else's yet.)"""
        before = self._stats.get(endpoint_id, _NEW)
        after = object.__new__(EndpointStats)
        fields_ = after.__dict__
        fields_.update(before.__dict__)
        self._stats[endpoint_id] = after
        return before, fields_

    def started(self, endpoint_id: str, probe: bool = False) -> None:
        before, after = self._copy(endpoint_id)
        after["inflight"] = before.inflight + 1
        after["requests"] = before.requests + 1
        if probe:
            after["probe_inflight"] = True

    def finished(self, endpoint_id: str) -> None:
        before, after = self._copy(endpoint_id)
        after["inflight"] = max(0, before.inflight - 1)

    def succeeded(self, endpoint_id: str, latency_ms: float) -> None:
        before, after = self._copy(endpoint_id)
        ewma = before.ewma_ms
        after["ewma_ms"] = latency_ms if ewma is None else (
            self.alpha * latency_ms + (1 - self.alpha) * ewma)
        after.update(_ANSWERED)

    def reported(self, endpoint_id: str, waiting: int, running: int, cache_usage: float,
                 now: float) -> None:
        """The endpoint's own load report (checked by ``affinity.parse_load_report``)."""
        self._copy(endpoint_id)[1].update(waiting=waiting, running=running,
                                          cache_usage=cache_usage, reported_at=now)

    def answered(self, endpoint_id: str) -> None:
        """It answered, if only to say it is busy (429): alive, but no latency sample."""
        self._copy(endpoint_id)[1].update(_ANSWERED)

    def failed(self, endpoint_id: str, now: float, tier_ids: Collection[str],
               hard: bool = False) -> bool:
        """Count a failure; returns True when this failure ejected the endpoint. ``hard``: the
        endpoint's process is gone (connection refused, a stream cut mid-way), which one
        failure shows as well as a run of them."""
        before, after = self._copy(endpoint_id)
        failures = before.consecutive_failures + 1
        after.update(failures=before.failures + 1, probe_inflight=False,
                     consecutive_failures=failures)
        # A failed probe ejects again at once; otherwise a healthy endpoint is ejected after
        # enough failures in a row (or one hard one), if the tier can spare it.
        enough = hard or failures >= self.ejection.consecutive_failures
        eject = before.probe_inflight or (
            before.ejected_until is None and enough and self._may_eject(tier_ids))
        if eject:
            backoff = min(self.ejection.max_backoff_s,
                          self.ejection.base_backoff_s * 2 ** before.backoff_level)
            after.update(ejected_until=now + backoff, ejections=before.ejections + 1,
                         backoff_level=before.backoff_level + 1)
        return eject

    def _may_eject(self, tier_ids: Collection[str]) -> bool:
        ejected = sum(1 for i in tier_ids if self.get(i).ejected_until is not None)
        allowed = max(1, int(self.ejection.max_ejection_share * len(tier_ids)))
        return ejected + 1 <= allowed


_ANSWERED = {"consecutive_failures": 0, "ejected_until": None, "probe_inflight": False,
             "backoff_level": 0}


@dataclass
class RetryBudget:
    """Retries may be at most ``ratio`` of the requests of the last ``window_s`` seconds (plus
    ``min_retries`` so a quiet router can still retry), so that in an outage retries cannot
    multiply the load on what is left (Envoy's retry budget, Finagle's RetryBudget)."""

    ratio: float = 0.2
    min_retries: int = 5
    window_s: float = 10.0
    _requests: deque = field(default_factory=deque)
    _retries: deque = field(default_factory=deque)

    def _trim(self, now: float) -> None:
        for q in (self._requests, self._retries):
            while q and q[0] <= now - self.window_s:
                q.popleft()

    def request(self, now: float) -> None:
        self._trim(now)
        self._requests.append(now)

    def try_retry(self, now: float) -> bool:
        """Spend one retry if the budget allows it."""
        self._trim(now)
        if len(self._retries) >= self.min_retries + self.ratio * len(self._requests):
            return False
        self._retries.append(now)
        return True
