"""The routing policy and the ejection/budget rules, on plain data (no sockets, no clock)."""

import random
from collections import Counter

import pytest

from cloud_router.endpoints import Endpoint
from cloud_router.policy import PolicyConfig, RequestHints, choose_endpoint
from cloud_router.stats import EjectionConfig, EndpointStats, RetryBudget, StatsBook


def ep(node, tier="edge", region="", zone="", lat=None, lon=None, model="tiny", mc=0, rtt=None):
    service = "edgegen-edge" if tier == "edge" else "edgegen-central"
    return Endpoint(id=f"{service}-{node}-8000", service=service, node=node,
                    address="127.0.0.1", port=8000, tier=tier, model=model, region=region,
                    zone=zone, lat=lat, lon=lon, max_concurrency=mc, rtt_ms=rtt)


PARIS = ep("paris", region="eu-west", zone="eu-west-1a", lat=48.86, lon=2.35)
LONDON = ep("london", region="eu-west", zone="eu-west-1b", lat=51.51, lon=-0.13)
NYC = ep("nyc", region="us-east", zone="us-east-1a", lat=40.71, lon=-74.0)
TOKYO = ep("tokyo", region="ap-ne", lat=35.68, lon=139.69)
CENTRAL = ep("gpu", tier="central", region="eu-central")
FLEET = [PARIS, LONDON, NYC, TOKYO, CENTRAL]


def choose(endpoints=FLEET, stats=None, seed=0, now=100.0, exclude=frozenset(), **hints):
    hints.setdefault("model", "tiny")
    return choose_endpoint(endpoints, RequestHints(**hints), stats or {}, random.Random(seed),
                           now, PolicyConfig(), exclude, explain=True)


@pytest.mark.parametrize("hints, nodes, reason", [
    (dict(region="us-east"), {"nyc"}, "nearest:region=us-east"),
    (dict(region="ap-ne"), {"tokyo"}, "nearest:region=ap-ne"),
    (dict(region="eu-west"), {"paris", "london"}, "nearest:region=eu-west"),
    (dict(region="eu-west", zone="eu-west-1b"), {"london"}, "nearest:zone=eu-west-1b"),
    (dict(location=(52.37, 4.90)), {"london", "paris"}, "nearest:location="),  # Amsterdam
    (dict(location=(35.0, 135.7)), {"tokyo"}, "nearest:location="),  # Kyoto
    (dict(location=(42.36, -71.06)), {"nyc"}, "nearest:location=306km"),  # Boston
    # region hint decides first, location only orders inside the region
    (dict(region="eu-west", location=(40.7, -74.0)), {"london", "paris"},
     "nearest:region=eu-west"),
])
def test_nearest_by_hint(hints, nodes, reason):
    seen = {choose(seed=s, **hints).endpoint.node for s in range(40)}
    assert seen == nodes
    assert choose(**hints).reason.startswith(reason)


def test_unknown_region_falls_back_to_other_evidence():
    d = choose(region="mars", location=(35.0, 135.7))
    assert d.endpoint.node == "tokyo" and d.reason.startswith("nearest:location=")


def test_endpoints_without_coordinates_rank_after_located_ones_for_a_location_hint():
    nowhere = ep("nowhere")
    assert choose([nowhere, NYC], location=(48.0, 2.0)).endpoint is NYC


def test_consul_rtt_ranks_when_no_hint():
    a, b, c = ep("a", rtt=30.0), ep("b", rtt=2.0), ep("c", rtt=90.0)
    d = choose([a, b, c])
    assert d.endpoint is b and d.reason == "nearest:rtt=2.0ms"


def test_ewma_ranks_when_nothing_else_and_unmeasured_are_explored_first():
    a, b, c = ep("a"), ep("b"), ep("c")
    stats = {a.id: EndpointStats(ewma_ms=45.0), b.id: EndpointStats(ewma_ms=6.0),
             c.id: EndpointStats(ewma_ms=130.0)}
    for seed in range(20):
        assert choose([a, b, c], stats=stats, seed=seed).endpoint is b
    assert choose([a, b, c], stats=stats).reason == "nearest:ewma=6.0ms"
    fresh = ep("fresh")
    d = choose([a, b, c, fresh], stats=stats)
    assert d.endpoint is fresh and d.reason == "nearest:ewma=unmeasured"


def test_power_of_two_choices_prefers_the_less_loaded_of_the_nearest_few():
    stats = {PARIS.id: EndpointStats(inflight=7), LONDON.id: EndpointStats(inflight=1)}
    picks = Counter(choose(stats=stats, seed=s, region="eu-west").endpoint.node
                    for s in range(50))
    assert picks == {"london": 50}
    even = Counter(choose(seed=s, region="eu-west").endpoint.node for s in range(200))
    assert set(even) == {"paris", "london"}  # equal load: the random draw spreads them


def test_p2c_never_leaves_the_near_group_for_a_far_endpoint():
    near1, near2, far = ep("n1", rtt=5.0), ep("n2", rtt=6.0), ep("far", rtt=120.0)
    stats = {near1.id: EndpointStats(inflight=50), near2.id: EndpointStats(inflight=50)}
    assert {choose([near1, near2, far], stats=stats, seed=s).endpoint.node
            for s in range(30)} == {"n1", "n2"}


def test_endpoint_at_max_concurrency_is_skipped():
    full = ep("full", region="eu-west", mc=2)
    other = ep("other", region="us-east", mc=2)
    stats = {full.id: EndpointStats(inflight=2)}
    d = choose([full, other], stats=stats, region="eu-west")
    assert d.endpoint is other and d.skipped == {full.id: "full"}


def test_when_every_endpoint_is_full_the_nearest_full_one_still_serves():
    a = ep("a", region="eu-west", mc=1)
    b = ep("b", region="us-east", mc=1)
    c = ep("c", tier="central", mc=1)
    stats = {a.id: EndpointStats(inflight=1), b.id: EndpointStats(inflight=1)}
    d = choose([a, b, c], stats=stats, region="eu-west")
    assert d.endpoint is c and d.reason == "fallback:central:edges-unavailable"
    stats[c.id] = EndpointStats(inflight=3)
    d = choose([a, b, c], stats=stats, region="eu-west")
    assert d.endpoint is a and d.reason == "saturated:edge"
    assert choose([a, b, c], stats=stats, region="eu-west", exclude={a.id, b.id}).reason \
        == "saturated:central"


def test_unknown_model_and_excluded_endpoints_are_not_candidates():
    d = choose(model="other")
    assert d.endpoint is None and d.reason == "none:no-endpoint"
    d = choose(region="us-east", exclude={NYC.id})
    assert d.endpoint.node != "nyc" and d.skipped[NYC.id] == "tried"


def test_fallback_to_central_and_none():
    d = choose([CENTRAL], region="eu-west")
    assert d.endpoint is CENTRAL and d.reason == "fallback:central:no-edge"
    edges_out = {e.id for e in (PARIS, LONDON, NYC, TOKYO)}
    d = choose(exclude=edges_out)
    assert d.endpoint is CENTRAL and d.reason == "fallback:central:edges-unavailable"
    d = choose(exclude=edges_out | {CENTRAL.id})
    assert d.endpoint is None and d.reason == "none:no-endpoint"
    assert choose([]).endpoint is None


def test_ejection_after_consecutive_failures_then_a_single_probe_decides():
    book = StatsBook(EjectionConfig(consecutive_failures=3, base_backoff_s=10, max_backoff_s=40,
                                    max_ejection_share=0.5))
    tier = [PARIS.id, LONDON.id, NYC.id, TOKYO.id]
    assert not book.failed(PARIS.id, 0, tier)
    assert not book.failed(PARIS.id, 1, tier)
    assert book.failed(PARIS.id, 2, tier)  # third in a row: ejected until 12
    snap = book.snapshot()
    d = choose(stats=snap, now=5, region="eu-west")
    assert d.endpoint is LONDON and d.skipped[PARIS.id] == "ejected"
    # backoff over: Paris is a candidate again and the request that goes there is its probe
    stats_busy_london = {**snap, LONDON.id: EndpointStats(inflight=9)}
    d = choose(stats=stats_busy_london, now=12.5, region="eu-west", zone="eu-west-1a")
    assert d.endpoint is PARIS and d.probe
    book.started(PARIS.id, probe=True)
    snap = book.snapshot()
    assert snap[PARIS.id].state(13) == "probing"
    assert choose(stats=snap, now=13, zone="eu-west-1a", region="eu-west").endpoint is LONDON
    # the probe fails: ejected again, for twice as long
    assert book.failed(PARIS.id, 14, tier)
    snap = book.snapshot()
    assert snap[PARIS.id].ejected_until == 14 + 20
    assert snap[PARIS.id].state(33) == "ejected" and snap[PARIS.id].state(34) == "probe-due"
    # a probe that succeeds brings it back at once
    book.started(PARIS.id, probe=True)
    book.succeeded(PARIS.id, 8.0)
    snap = book.snapshot()
    assert snap[PARIS.id].state(35) == "healthy" and snap[PARIS.id].ejections == 2
    assert choose(stats=snap, now=35, zone="eu-west-1a", region="eu-west").endpoint is PARIS


def test_ejections_never_exceed_the_configured_share_of_the_tier():
    book = StatsBook(EjectionConfig(consecutive_failures=1, max_ejection_share=0.5))
    tier = [PARIS.id, LONDON.id, NYC.id, TOKYO.id]
    assert book.failed(PARIS.id, 0, tier)
    assert book.failed(LONDON.id, 0, tier)
    assert not book.failed(NYC.id, 0, tier)  # a third would take 75% out
    assert book.snapshot()[NYC.id].state(1) == "healthy"
    single = StatsBook(EjectionConfig(consecutive_failures=1, max_ejection_share=0.1))
    assert single.failed(CENTRAL.id, 0, [CENTRAL.id])  # at least one may always be ejected


@pytest.mark.parametrize("failures, ejected", [
    # (hard?, when) of each failure in a row -> ejected after the last one
    ([(True, 0)], True),                        # a refused connection: gone, one is enough
    ([(False, 0)], False),                      # a timeout, a 5xx: one proves nothing
    ([(False, 0), (False, 1), (False, 2)], True),   # ... three in a row do
    ([(False, 0), (True, 1)], True),
])
def test_one_hard_failure_ejects_where_soft_ones_need_a_run(failures, ejected):
    book = StatsBook(EjectionConfig(consecutive_failures=3, max_ejection_share=0.5))
    tier = [PARIS.id, LONDON.id]
    results = [book.failed(PARIS.id, now, tier, hard=hard) for hard, now in failures]
    assert results[-1] is ejected and not any(results[:-1])
    assert (book.snapshot()[PARIS.id].state(failures[-1][1]) == "ejected") is ejected


def test_a_hard_failure_still_leaves_the_tier_its_share():
    book = StatsBook(EjectionConfig(consecutive_failures=3, max_ejection_share=0.5))
    tier = [PARIS.id, LONDON.id]
    assert book.failed(PARIS.id, 0, tier, hard=True)
    assert not book.failed(LONDON.id, 0, tier, hard=True)   # half the tier is out already
    assert book.snapshot()[LONDON.id].state(0) == "healthy"


def test_a_stats_snapshot_is_an_immutable_copy():
    book = StatsBook(EjectionConfig(consecutive_failures=1))
    book.started("a")
    snap = book.snapshot()
    book.started("a")
    book.failed("a", 0, ["a"])
    book.started("b")
    assert snap["a"] == EndpointStats(inflight=1, requests=1) and "b" not in snap
    assert book.snapshot()["a"].inflight == 2 and book.snapshot()["a"].ejected_until == 5.0
    with pytest.raises(TypeError):
        snap["b"] = EndpointStats()  # the mapping is read-only
    with pytest.raises(AttributeError):
        snap["a"].inflight = 0  # and so are its values
    book.forget_except(set())
    assert "a" in snap and set(book.snapshot()) == {"a", "b"}  # still in flight: kept


def test_ewma_smooths_observed_latency():
    book = StatsBook(ewma_alpha=0.5)
    book.succeeded("a", 10.0)
    book.succeeded("a", 30.0)
    assert book.snapshot()["a"].ewma_ms == 20.0


def test_retry_budget_caps_retries_to_a_share_of_recent_requests():
    budget = RetryBudget(ratio=0.2, min_retries=2, window_s=10)
    for i in range(10):
        budget.request(now=i * 0.1)
    granted = sum(budget.try_retry(now=1.0) for _ in range(10))
    assert granted == 4  # 2 + 20% of 10
    assert not budget.try_retry(now=5.0)
    assert budget.try_retry(now=11.5)  # the window moved on


# --- placement: queues and cached prefixes against nearness ---------------------------------

# Three edges of one region, 10 / 30 / 60 ms away by RTT (the nearest class is the region).
NEAR, MID, FAR = (ep(n, region="eu-west", rtt=rtt) for n, rtt in
                  (("near", 10.0), ("mid", 30.0), ("far", 60.0)))
TRIO = [NEAR, MID, FAR]


def reported(queued: int, at: float = 99.5) -> EndpointStats:
    return EndpointStats(waiting=queued, reported_at=at)


def place(stats=None, affinity=None, placement="cache", seed=0, now=100.0, **config):
    return choose_endpoint(TRIO, RequestHints(model="tiny", region="eu-west"), stats or {},
                           random.Random(seed), now, PolicyConfig(placement=placement, **config),
                           frozenset(), affinity, explain=True)


@pytest.mark.parametrize("queues, affinity, expected", [
    # nothing reported, nothing cached: the nearest (within the 5 ms slack: near alone)
    ({}, {}, "near"),
    # one queued request (200 ms) outweighs 20 ms of distance, not two ways of it
    ({"near": 1}, {}, "mid"),
    ({"near": 1, "mid": 1}, {}, "far"),
    ({"near": 1, "mid": 1, "far": 1}, {}, "near"),
    # a cached prefix of 4,000 characters saves ~400 ms of prefill: worth 50 ms of distance
    ({}, {"far": 4000}, "far"),
    # ... but not worth two requests queued ahead (400 ms) and the distance besides
    ({"far": 2}, {"far": 4000}, "near"),
    # a short cached prefix (30 characters, 3 ms) is no reason to go 20 ms further
    ({}, {"mid": 30}, "near"),
    # the credit is capped: a huge prefix cannot outweigh any queue
    ({"far": 11}, {"far": 10**9}, "near"),
])
def test_queues_and_cached_prefixes_are_traded_against_nearness(queues, affinity, expected):
    stats = {e.id: reported(queues.get(e.node, 0)) for e in TRIO}
    ids = {e.node: e.id for e in TRIO}
    d = place(stats, {ids[n]: chars for n, chars in affinity.items()})
    assert d.endpoint.node == expected, d.candidates
    if queues or any(c * 0.1 > 5 for c in affinity.values()):
        assert d.reason.startswith("placed:region=eu-west")
        row = next(r for r in d.candidates if r.node == expected)
        assert row.score_ms == min(r.score_ms for r in d.candidates)
    else:
        assert d.reason == "nearest:region=eu-west"


@pytest.mark.parametrize("waiting, running, capacity, queued", [
    (1, 2, 4, 0),    # a slot is free: it is admitted at the agent's next step, no queue
    (2, 4, 4, 2),    # every slot busy: both wait
    (3, 3, 4, 2),
    (3, 0, 0, 3),    # capacity unknown: what the agent said was waiting
])
def test_a_queue_is_what_an_endpoint_holds_beyond_its_slots(waiting, running, capacity, queued):
    s = EndpointStats(waiting=waiting, running=running, reported_at=99.5)
    assert s.queued(100.0, 1.0, capacity) == queued
    assert s.queued(101.0, 1.0, capacity) == 0   # and only while the report is fresh


def test_the_explanation_carries_every_figure_of_the_trade():
    stats = {NEAR.id: reported(1), MID.id: reported(0), FAR.id: reported(0)}
    d = place(stats, {FAR.id: 4000})
    rows = {r.node: r for r in d.candidates}
    assert d.endpoint is FAR
    assert d.reason == "placed:region=eu-west,queued=0,cached=4000chars"
    assert (rows["near"].queued, rows["near"].score_ms) == (1, 200.0)
    assert (rows["mid"].queued, rows["mid"].cached_chars, rows["mid"].score_ms) == (0, 0, 20.0)
    assert (rows["far"].cached_chars, rows["far"].score_ms) == (4000, 50.0 - 400.0)


def test_stale_reports_and_the_nearest_placement_ignore_queues_and_caches():
    stale = {NEAR.id: reported(5, at=98.0)}   # 2 s old: past the 1 s a report is trusted
    assert place(stale).endpoint is NEAR and place(stale).reason == "nearest:region=eu-west"
    fresh = {NEAR.id: reported(5)}
    assert place(fresh).endpoint is not NEAR
    assert place(fresh, {FAR.id: 4000}, placement="nearest").endpoint is NEAR
    assert place(fresh, placement="nearest").reason == "nearest:region=eu-west"


def test_placement_stays_inside_the_nearest_class():
    # a cached prefix on another region's edge does not pull the request out of its region
    other = ep("other", region="us-east", rtt=1.0)
    d = choose_endpoint([NEAR, other], RequestHints(model="tiny", region="eu-west"), {},
                        random.Random(0), 100.0, PolicyConfig(), frozenset(), {other.id: 10**6})
    assert d.endpoint is NEAR


@pytest.mark.parametrize("hints", [dict(region="eu-west"), dict(location=(35.0, 135.7)),
                                   dict(region="mars")])
def test_a_decision_unexplained_is_the_same_choice_without_the_candidates(hints):
    """Forwarded requests skip the explanation (its rows cost more than the choice); the
    endpoint and the reason are the same as /edgegen/v1/route shows."""
    hints = RequestHints(model="tiny", **hints)
    full = choose_endpoint(FLEET, hints, {}, random.Random(3), 100.0, PolicyConfig(),
                           explain=True)
    short = choose_endpoint(FLEET, hints, {}, random.Random(3), 100.0, PolicyConfig())
    assert (short.endpoint, short.reason) == (full.endpoint, full.reason)
    assert full.candidates and short.candidates == ()
