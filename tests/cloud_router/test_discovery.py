"""The discovery watcher: the pure mapping from Consul's health JSON, Consul's blocking-client
rules, and the watcher following a real `edgegen registry` process (changes, outage, restart)."""

from __future__ import annotations

import asyncio
import contextlib
import time

import httpx
import pytest

from cloud_router.discovery import (
    ServiceWatcher,
    TokenBucket,
    endpoints_from_health,
    next_index,
)
from cloud_router.endpoints import Endpoint
from tests.cloud_router.registry_support import start_registry
from tests.support.procs import free_port

# The sample entry of Consul's health.mdx, with the Meta an edgegen agent registers.
CONSUL_ENTRY = {
    "Node": {"ID": "40e4a748-2192-161a-0510-9bf59fe950b5", "Node": "foobar",
             "Address": "10.1.10.12", "Datacenter": "dc1",
             "TaggedAddresses": {"lan": "10.1.10.12", "wan": "10.1.10.12"},
             "Meta": {"instance_type": "t2.medium"}},
    "Service": {"ID": "edgegen-edge-n1-8000", "Service": "edgegen-edge",
                "Tags": ["model=smollm2", "digest=0123456789ab"], "Address": "10.1.10.13",
                "Meta": {"node": "n1", "region": "eu-west", "zone": "eu-west-1a",
                         "lat": "52.52", "lon": "13.405", "model": "smollm2",
                         "digest": "0123456789ab", "tier": "edge", "max_concurrency": "4",
                         "mqtt": "mqtt://10.1.10.13:1883"},
                "Port": 8000, "Weights": {"Passing": 10, "Warning": 1}},
    "Checks": [{"Node": "foobar", "CheckID": "service:edgegen-edge-n1-8000",
                "Status": "passing", "ServiceID": "edgegen-edge-n1-8000"}],
}


def test_endpoints_from_health_maps_every_field():
    (ep,) = endpoints_from_health([CONSUL_ENTRY])
    assert ep == Endpoint(
        id="edgegen-edge-n1-8000", service="edgegen-edge", node="n1", address="10.1.10.13",
        port=8000, tier="edge", model="smollm2", digest="0123456789ab", region="eu-west",
        zone="eu-west-1a", lat=52.52, lon=13.405, max_concurrency=4,
        mqtt="mqtt://10.1.10.13:1883", tags=("model=smollm2", "digest=0123456789ab"))
    assert ep.meta["region"] == "eu-west" and ep.url == "http://10.1.10.13:8000"


def test_endpoints_from_health_falls_back_and_tolerates_bad_meta():
    entry = {
        "Node": {"Node": "consul-node", "Address": "10.0.0.9"},
        "Service": {"ID": "edgegen-central-g1-9000", "Service": "edgegen-central",
                    "Address": "", "Port": 9000,
                    "Meta": {"lat": "north", "lon": "", "max_concurrency": "many"}},
    }
    junk = [{"Service": {"ID": "no-port"}}, {"Service": {"Port": 1}}, "not a dict"]
    (ep,) = endpoints_from_health([entry, *junk])
    assert (ep.node, ep.address, ep.tier, ep.lat, ep.lon, ep.max_concurrency) == \
        ("consul-node", "10.0.0.9", "central", None, None, 0)
    assert endpoints_from_health([]) == []


@pytest.mark.parametrize("previous,returned,expected", [
    (0, 5, 5), (5, 9, 9), (9, 9, 9), (9, 4, 0), (0, 0, 1), (3, 0, 0),
])
def test_blocking_index_rules(previous, returned, expected):
    assert next_index(previous, returned) == expected


def test_token_bucket_allows_a_burst_of_two_then_limits():
    now = [0.0]
    bucket = TokenBucket(burst=2, interval=1.0, clock=lambda: now[0])
    assert [bucket.delay(), bucket.delay()] == [0.0, 0.0]
    assert bucket.delay() == pytest.approx(1.0)
    now[0] = 10.0
    assert bucket.delay() == 0.0


def test_watcher_resets_a_backwards_index_with_a_fake_consul():
    """Consul's rule: an index lower than the last one restarts the loop from 0."""
    indexes = iter([10, 12, 3, 4])
    seen_params = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen_params.append(dict(request.url.params))
        idx = next(indexes, None)
        if idx is None:
            return httpx.Response(500, text="done")
        return httpx.Response(200, json=[CONSUL_ENTRY], headers={"X-Consul-Index": str(idx)})

    async def scenario():
        w = ServiceWatcher("http://consul.test", "edgegen-edge", wait="5s", rate_interval=0.01,
                           transport=httpx.MockTransport(handler))
        async with running(w):
            for _ in range(200):
                if len(seen_params) >= 5:
                    break
                await asyncio.sleep(0.01)
        return w

    w = asyncio.run(scenario())
    assert seen_params[0] == {"passing": "1"}
    assert seen_params[1]["index"] == "10" and seen_params[1]["wait"] == "5s"
    assert seen_params[2]["index"] == "12"
    assert "index" not in seen_params[3]           # 3 < 12: reset to 0
    assert seen_params[4]["index"] == "4"
    assert w.stale and [e.id for e in w.endpoints] == ["edgegen-edge-n1-8000"]


def test_generation_moves_only_when_the_endpoints_change():
    """The router's table rebuilds its fleet when a watcher's generation moves."""
    moved = {**CONSUL_ENTRY, "Service": {**CONSUL_ENTRY["Service"], "Port": 8001}}
    answers = iter([(1, [CONSUL_ENTRY]), (2, [CONSUL_ENTRY]), (3, [moved]), (4, [moved])])
    generations = []

    def handler(request: httpx.Request) -> httpx.Response:
        generations.append(w.generation)
        index, body = next(answers, (None, None))
        if index is None:
            return httpx.Response(500, text="done")
        return httpx.Response(200, json=body, headers={"X-Consul-Index": str(index)})

    async def scenario():
        async with running(w):
            await until(lambda: len(generations) >= 6)

    w = ServiceWatcher("http://consul.test", "edgegen-edge", rate_interval=0.01,
                       max_backoff=0.01, transport=httpx.MockTransport(handler))
    assert w.generation == 0
    asyncio.run(scenario())
    # before each read: nothing yet, first table, same table, port changed, same, outage
    assert generations[:6] == [0, 1, 1, 2, 2, 2]
    assert w.stale and w.endpoints[0].port == 8001


def register(url: str, sid: str, status: str = "passing", **meta) -> None:
    r = httpx.put(f"{url}/v1/agent/service/register", json={
        "Name": "edgegen-edge", "ID": sid, "Address": "127.0.0.1", "Port": 8000,
        "Meta": {"node": sid, **meta}, "Check": {"TTL": "10m", "Status": status}})
    r.raise_for_status()


async def until(predicate, timeout: float = 15.0) -> float:
    t0 = time.monotonic()
    while not predicate():
        if time.monotonic() - t0 > timeout:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)
    return time.monotonic() - t0


@contextlib.asynccontextmanager
async def running(watcher: ServiceWatcher):
    """The watcher's loop runs as a task inside the block and is cancelled after it."""
    task = asyncio.create_task(watcher.run())
    try:
        yield
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def test_watcher_follows_a_real_registry_through_an_outage(tmp_path):
    port = free_port()
    proc, url = start_registry(tmp_path, port=port, data_dir=tmp_path / "data", name="reg1")
    changes: list[list[str]] = []

    async def scenario():
        nonlocal proc
        w = ServiceWatcher(url, "edgegen-edge", wait="30s", max_backoff=0.5,
                           on_change=lambda eps: changes.append([e.id for e in eps]))
        async with running(w):
            assert await w.wait_loaded(15)
            assert w.endpoints == [] and not w.stale and w.last_index >= 1
            register(url, "a", region="eu")
            await until(lambda: [e.id for e in w.endpoints] == ["a"])
            assert w.endpoints[0].region == "eu"
            register(url, "b")
            await until(lambda: len(w.endpoints) == 2)
            # A check turning critical removes the instance from the passing table.
            httpx.put(f"{url}/v1/agent/check/fail/service:b").raise_for_status()
            latency = await until(lambda: [e.id for e in w.endpoints] == ["a"])
            assert latency < 2

            proc.kill()                               # Consul goes away
            await until(lambda: w.stale)
            assert [e.id for e in w.endpoints] == ["a"], "never emptied by an outage"
            proc.stop()
            proc, _ = start_registry(tmp_path, port=port, data_dir=tmp_path / "data",
                                     name="reg2")
            await until(lambda: not w.stale, timeout=20)
            assert [e.id for e in w.endpoints] == ["a"]
            register(url, "c")
            await until(lambda: sorted(e.id for e in w.endpoints) == ["a", "c"])

    try:
        asyncio.run(scenario())
    finally:
        proc.stop()
    assert changes[0] == [] and ["a"] in changes and changes[-1] == ["a", "c"]


def test_watcher_started_before_the_registry_loads_once_it_appears(tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    procs = []

    async def scenario():
        w = ServiceWatcher(url, "edgegen-edge", max_backoff=0.5)
        async with running(w):
            await asyncio.sleep(1.0)
            assert w.stale and w.endpoints == [] and w.last_error
            proc, _ = start_registry(tmp_path, port=port)
            procs.append(proc)
            register(url, "late")
            await until(lambda: [e.id for e in w.endpoints] == ["late"], timeout=20)
            assert not w.stale

    try:
        asyncio.run(scenario())
    finally:
        for p in procs:
            p.stop()


def test_with_rtt_uses_consuls_coordinates_of_each_catalog_node():
    from cloud_router.discovery import with_rtt
    from cloud_router.registry.coordinates import coordinate_from_location

    entries = [dict(CONSUL_ENTRY), {**CONSUL_ENTRY, "Node": {"Node": "elsewhere"},
                                    "Service": {**CONSUL_ENTRY["Service"], "ID": "x"}}]
    eps = endpoints_from_health(entries)
    coords = [{"Node": "foobar", "Coord": coordinate_from_location(52.52, 13.40)},
              {"Node": "router", "Coord": coordinate_from_location(48.86, 2.35)}]
    a, b = with_rtt(eps, entries, coords, near="router")
    assert 8.0 < a.rtt_ms < 9.5 and b.rtt_ms is None
    assert [e.rtt_ms for e in with_rtt(eps, entries, coords, near="nobody")] == [None, None]


def test_watcher_with_near_orders_by_rtt_over_a_real_registry(tmp_path):
    proc, url = start_registry(tmp_path)
    places = {"berlin": (52.52, 13.40), "paris": (48.86, 2.35), "tokyo": (35.68, 139.69)}
    for node, (lat, lon) in places.items():
        register(url, node, lat=str(lat), lon=str(lon))

    async def scenario():
        w = ServiceWatcher(url, "edgegen-edge", near="paris")
        async with running(w):
            await until(lambda: len(w.endpoints) == 3)
            return w.endpoints

    try:
        eps = asyncio.run(scenario())
    finally:
        proc.stop()
    assert [e.node for e in eps] == ["paris", "berlin", "tokyo"]
    assert eps[0].rtt_ms < 0.1 < eps[1].rtt_ms < eps[2].rtt_ms
