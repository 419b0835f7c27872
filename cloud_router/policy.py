"""Which endpoint serves a request, and why. Pure: a snapshot in, a decision out.

Given the endpoints from Consul, the request's hints, the router's per-endpoint stats, a
random source and ``now``, :func:`choose_endpoint` returns a :class:`Decision` naming the
endpoint and the reason (the ``x-edgegen-route`` header). It opens no connection and reads no
clock, so every rule below has a table-driven test.

1. Candidates: endpoints of the tier that serve the requested model, not excluded (already
   tried by this request), not ejected (an ejected endpoint whose backoff is over is a
   candidate again; choosing it makes the request its probe), not at ``max_concurrency``.
2. Nearness, in this order of evidence: zone/region hint (same zone, then same region, then
   the rest), distance from the client's location to the endpoint's lat/lon, Consul's RTT
   estimate, the router's EWMA of observed latency (unmeasured endpoints rank first, so each
   gets measured).
3. Load: the "nearest few" are the best-ranked endpoints whose evidence is within a slack of
   the best one (at most ``nearest_few``); among them, power of two choices on in-flight.
   With ``placement="cache"`` and evidence of queues or cached prefixes in the nearest class,
   the trade is explicit, in milliseconds: score = distance beyond the nearest (evidence in
   ms; 1 ms per 100 km) + ``queue_ms`` per request the endpoint reported queued - the prefill
   it saves (``prefill_ms_per_char`` per character of the longest prompt prefix last sent to
   it, capped); the nearest few are then those within ``slack_ms`` of the best score.
4. Fallback: no edge candidate → the central tier, chosen the same way. When every live
   endpoint is only full (saturation), the nearest full edge (else central) still gets the
   request: agents queue and answer 429 themselves. Nothing live → no endpoint.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Mapping, NamedTuple, Sequence

from cloud_router.endpoints import Endpoint
from cloud_router.geo import great_circle_km
from cloud_router.stats import EndpointStats

_NO_STATS = EndpointStats()


class RequestHints(NamedTuple):
    """What a request says of where it should go (a tuple: one is made per request, and a
    frozen dataclass costs several times as much to make)."""

    model: str
    region: str = ""
    zone: str = ""
    location: tuple[float, float] | None = None
    prefix: tuple[tuple[bytes, int], ...] = ()   # affinity.prefix_keys of its prompt


PLACEMENTS = ("cache", "nearest")


@dataclass(frozen=True)
class PolicyConfig:
    nearest_few: int = 2          # how many near endpoints power-of-two-choices picks among
    slack_ratio: float = 0.25     # "as near as the best": within 25% ...
    slack_km: float = 100.0       # ... or 100 km of the best by location
    slack_ms: float = 5.0         # ... or 5 ms of the best by RTT / EWMA
    placement: str = "cache"      # cache: weigh queues and cached prefixes too | nearest
    queue_ms: float = 200.0       # what one request queued ahead costs a new one
    prefill_ms_per_char: float = 0.1    # reading a prompt again: ~0.4 ms a token on edge CPUs
    max_cache_credit_ms: float = 2000.0
    # A load report older than this says nothing: an endpoint avoided for its queue sends no
    # new report, so an old one must not keep it avoided once its queue has likely drained.
    report_ttl_s: float = 1.0


@dataclass(frozen=True)
class Ranked:
    """One candidate as the policy saw it (for `/edgegen/v1/route`)."""

    endpoint_id: str
    node: str
    tier: str
    evidence: str        # region | zone | location | rtt | ewma
    value: float | str   # the evidence's value: km, ms, region name
    inflight: int
    state: str
    queued: int = 0                 # requests the endpoint reported queued (fresh reports)
    cached_chars: int = 0           # the longest prompt prefix last sent to it
    score_ms: float | None = None   # the placement score, when queues or caches counted


@dataclass(frozen=True)
class Decision:
    endpoint: Endpoint | None
    reason: str                                   # x-edgegen-route
    probe: bool = False                           # this request decides an ejected endpoint
    candidates: tuple[Ranked, ...] = ()  # the chosen tier's, ranked (only when explained)
    skipped: dict[str, str] = field(default_factory=dict)  # endpoint id -> why not a candidate

    @property
    def tier(self) -> str:
        return self.endpoint.tier if self.endpoint else ""


def choose_endpoint(
    endpoints: Sequence[Endpoint],
    hints: RequestHints,
    stats: Mapping[str, EndpointStats],
    rng: random.Random,
    now: float,
    config: PolicyConfig = PolicyConfig(),
    exclude: frozenset[str] | set[str] = frozenset(),
    affinity: Mapping[str, int] | None = None,
    explain: bool = False,
) -> Decision:
    """The endpoint for one request attempt; ``exclude`` holds the ones this request tried;
    ``affinity``: endpoint id -> characters of the request's prompt prefix last sent there.
    ``explain``: list every candidate with its figures (``/edgegen/v1/route``); a forwarded
    request needs only the choice and its reason."""
    skipped: dict[str, str] = {}
    ctx = _Context(hints, stats, rng, config, skipped, now,
                   affinity if config.placement == "cache" and affinity else {}, explain)
    edges = _candidates(endpoints, "edge", hints, stats, now, exclude, skipped)
    if edges:
        return _pick(edges, ctx, route=None)
    central = _candidates(endpoints, "central", hints, stats, now, exclude, skipped)
    if central:
        has_edge = any(e.tier == "edge" and e.model == hints.model for e in endpoints)
        why = "edges-unavailable" if has_edge else "no-edge"
        return _pick(central, ctx, route=f"fallback:central:{why}")
    # Saturation: every live endpoint is at max_concurrency. The agents queue (and answer 429
    # when their queue is full), so send it to the nearest of the full edges, else central.
    for tier in ("edge", "central"):
        full = [e for e in endpoints if e.tier == tier and skipped.get(e.id) == "full"]
        if full:
            return _pick(full, ctx, route=f"saturated:{tier}")
    return Decision(None, "none:no-endpoint", skipped=skipped)


@dataclass(slots=True)
class _Context:
    """What one decision reads besides the candidates (not frozen: one per forwarded request,
    and a frozen dataclass's ``__init__`` costs several times a plain one's)."""

    hints: RequestHints
    stats: Mapping[str, EndpointStats]
    rng: random.Random
    config: PolicyConfig
    skipped: dict[str, str]
    now: float
    affinity: Mapping[str, int]
    explain: bool = False


def _candidates(endpoints, tier, hints, stats, now, exclude, skipped) -> list[Endpoint]:
    out = []
    for e in endpoints:
        if e.tier != tier or e.model != hints.model:
            continue
        s = stats.get(e.id, _NO_STATS)
        state = s.state(now)
        if e.id in exclude:
            skipped[e.id] = "tried"
        elif state in ("ejected", "probing"):
            skipped[e.id] = state
        elif e.max_concurrency and s.inflight >= e.max_concurrency:
            skipped[e.id] = "full"
        else:
            out.append(e)
    return out


def _nearness(e: Endpoint, hints: RequestHints, s: EndpointStats) -> tuple[int, str, float]:
    """(class, evidence, value): lower is nearer. Class 0/1/2 = same zone/region/other when a
    hint names them; within a class the best numeric evidence available ranks."""
    cls = 2
    if hints.zone and e.zone == hints.zone:
        cls = 0
    elif hints.region and e.region == hints.region:
        cls = 1
    if not (hints.zone or hints.region):
        cls = 0
    if hints.location and e.lat is not None and e.lon is not None:
        return cls, "location", great_circle_km(*hints.location, e.lat, e.lon)
    if hints.location:  # a location was given but this endpoint has no coordinates: after those
        return cls, "location", math.inf
    if e.rtt_ms is not None:
        return cls, "rtt", e.rtt_ms
    return cls, "ewma", s.ewma_ms if s.ewma_ms is not None else 0.0


def _rank(item: tuple[tuple[int, str, float], Endpoint]) -> tuple[int, float, str]:
    (cls, _evidence, value), e = item
    return cls, value, e.id


def _pick(cands, ctx: _Context, route: str | None) -> Decision:
    hints, stats, config = ctx.hints, ctx.stats, ctx.config
    keyed = [(_nearness(e, hints, stats.get(e.id, _NO_STATS)), e) for e in cands]
    if len(keyed) > 1:
        keyed.sort(key=_rank)
    (best_cls, evidence, best_val), _ = keyed[0]
    slack = config.slack_km if evidence == "location" else config.slack_ms
    limit = best_val + max(slack, config.slack_ratio * best_val)
    near = [e for (cls, _ev, val), e in keyed if cls == best_cls and val <= limit]
    queued = _queues(keyed, ctx)
    scores = _scores([(k, e) for k, e in keyed if k[0] == best_cls], best_val, queued, ctx) \
        if queued or ctx.affinity else {}   # neither: nothing to trade (the usual case)
    if scores:   # queues or cached prefixes: the explicit trade
        best = min(scores.values())
        near = sorted((e for _k, e in keyed if e.id in scores
                       and scores[e.id] <= best + config.slack_ms), key=lambda e: scores[e.id])
    near = near[: max(1, config.nearest_few)]
    if len(near) == 1:
        chosen = near[0]
    else:  # power of two choices on in-flight requests (the draw itself breaks ties)
        a, b = (near[i] for i in ctx.rng.sample(range(len(near)), 2))
        chosen = b if _load(b, stats) < _load(a, stats) else a
    s = stats.get(chosen.id, _NO_STATS)
    cls, ev, val = keyed[0][0] if len(keyed) == 1 else next(k for k, e in keyed if e is chosen)
    if cls == 0 and hints.zone:
        why = f"zone={chosen.zone}"
    elif cls <= 1 and hints.region:
        why = f"region={chosen.region}"
    elif ev == "location":
        why = f"location={val:.0f}km" if math.isfinite(val) else "location=unknown"
    elif ev == "rtt":
        why = f"rtt={val:.1f}ms"
    else:
        why = f"ewma={val:.1f}ms" if s.ewma_ms is not None else "ewma=unmeasured"
    if scores:
        why = (f"placed:{why},queued={queued.get(chosen.id, 0)},"
               f"cached={ctx.affinity.get(chosen.id, 0)}chars")
    else:
        why = f"nearest:{why}"
    ranked = tuple(
        Ranked(e.id, e.node, e.tier, ev_, round(v, 3) if math.isfinite(v) else "unknown",
               stats.get(e.id, _NO_STATS).inflight, "candidate", queued.get(e.id, 0),
               ctx.affinity.get(e.id, 0),
               round(scores[e.id], 3) if e.id in scores and math.isfinite(scores[e.id])
               else None)
        for (_c, ev_, v), e in keyed) if ctx.explain else ()
    return Decision(chosen, route or why, probe=s.ejected_until is not None,
                    candidates=ranked, skipped=ctx.skipped)


def _queues(keyed, ctx: _Context) -> dict[str, int]:
    """Endpoint id -> requests it reported queued (fresh reports only), for the endpoints
    that have any; empty unless placement weighs queues."""
    if ctx.config.placement != "cache":
        return {}
    queues = {}
    for _k, e in keyed:
        s = ctx.stats.get(e.id)
        if s is not None and s.reported_at is not None:
            n = s.queued(ctx.now, ctx.config.report_ttl_s, e.max_concurrency)
            if n:
                queues[e.id] = n
    return queues


def _scores(members, best_val: float, queued: Mapping[str, int],
            ctx: _Context) -> dict[str, float]:
    """Endpoint id -> placement score (ms) of the nearest class's members; empty when no
    member reported a queue and none holds a prefix worth more than the slack (nearness
    alone decides then)."""
    c = ctx.config
    credit = {e.id: min(c.max_cache_credit_ms, ctx.affinity.get(e.id, 0) * c.prefill_ms_per_char)
              for _k, e in members}
    if not any(queued.get(e.id) or credit[e.id] > c.slack_ms for _k, e in members):
        return {}
    return {e.id: (val - best_val) / (100.0 if ev == "location" else 1.0)
            + c.queue_ms * queued.get(e.id, 0) - credit[e.id]
            for (_cls, ev, val), e in members}


def _load(e: Endpoint, stats) -> int:
    return stats.get(e.id, _NO_STATS).inflight
