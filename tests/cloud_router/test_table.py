"""The fleet snapshot and the table that keeps it: rebuilt when a source reports a change,
never per request; stats of endpoints that left dropped then."""

import random

import pytest

from cloud_router.endpoints import Endpoint
from cloud_router.fleet import Fleet
from cloud_router.policy import RequestHints
from cloud_router.table import EndpointTable


def ep(node, tier="edge", model="tiny", region="") -> Endpoint:
    service = "edgegen-edge" if tier == "edge" else "edgegen-central"
    return Endpoint(id=f"{service}-{node}-8000", service=service, node=node,
                    address="127.0.0.1", port=8000, tier=tier, model=model, region=region)


A, B, C, GPU = ep("a"), ep("b", model="big"), ep("c"), ep("gpu", tier="central")


class CountingSource:
    """A source that counts how often its endpoints are read."""

    def __init__(self, endpoints):
        self._endpoints, self.generation, self.reads = list(endpoints), 0, 0

    @property
    def endpoints(self):
        self.reads += 1
        return list(self._endpoints)

    def set(self, endpoints):
        self._endpoints = list(endpoints)
        self.generation += 1


def test_fleet_of_endpoints_is_an_immutable_index():
    stale_a = ep("a", region="old")
    fleet = Fleet.of([stale_a, B, GPU, A, C], known_models={"gone"})
    assert fleet.endpoints == (A, B, GPU, C)   # a later endpoint with the same id wins
    assert fleet.by_id[A.id].region == ""
    assert fleet.serving["tiny"] == (A, GPU, C) and fleet.serving["big"] == (B,)
    assert fleet.tier_ids == {"edge": (A.id, B.id, C.id), "central": (GPU.id,)}
    assert fleet.models == ("big", "tiny")
    assert fleet.known_models == {"big", "tiny", "gone"}
    for mapping in (fleet.by_id, fleet.serving, fleet.tier_ids):
        with pytest.raises(TypeError):
            mapping["x"] = ()


def test_the_fleet_is_rebuilt_only_when_a_source_reports_a_change():
    edges, central = CountingSource([A, B]), CountingSource([GPU])
    table = EndpointTable([edges, central], rng=random.Random(0), clock=lambda: 0.0)
    first = table.fleet
    for _ in range(20):
        table.choose(RequestHints(model="tiny"))
        table.known_model("tiny")
        table.models()
        table.tier_ids("edge")
        table.rows()
    assert table.fleet is first and (edges.reads, central.reads) == (1, 1)
    edges.set([C])
    assert table.choose(RequestHints(model="tiny")).endpoint in (C, GPU)
    assert table.fleet is not first and (edges.reads, central.reads) == (2, 2)
    assert table.models() == ["tiny"] and table.tier_ids("edge") == (C.id,)
    # a model whose endpoints all went away is still known: unavailable, not unknown
    assert table.known_model("big") and not table.known_model("never")


def test_stats_of_endpoints_that_left_are_dropped_when_the_fleet_changes():
    source = CountingSource([A, B])
    table = EndpointTable([source])
    assert table.models() == ["big", "tiny"]
    table.stats.succeeded(A.id, 5.0)
    table.stats.started(B.id)                  # still in flight when it leaves
    source.set([C])
    assert table.models() == ["tiny"]
    assert set(table.stats.snapshot()) == {B.id}
    table.stats.finished(B.id)
    table.models()                             # no change reported: nothing to rebuild
    assert set(table.stats.snapshot()) == {B.id}
    source.set([C])
    table.models()
    assert set(table.stats.snapshot()) == set()
