"""Agent registration against a real `edgegen registry` process, with a small HTTP server
standing in for the agent's /readyz: payload, check, hot-swap update, deregistration,
registry down at start, registry restarted without its data."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import httpx
import pytest

from edge_agent.bundle import Bundle
from edge_agent.errors import RegistrationError
from edge_agent.registration import ConsulKV, ConsulRegistration, registration_payload
from edge_agent.settings import AgentSettings
from tests.cloud_router.registry_support import ReadyServer, start_registry
from tests.support.procs import free_port


def bundle(name="tiny", digest="ab" * 32) -> Bundle:
    return Bundle(path=Path("/nonexistent"), manifest={"name": name}, digest=digest)


def settings(consul: str, port: int, **kw) -> AgentSettings:
    base = dict(bundle="/nonexistent", node="n1", port=port, consul=consul, region="eu",
                zone="eu-1", lat=52.5, lon=13.4, max_concurrency=3)
    return AgentSettings(**{**base, **kw})


def test_payload_follows_the_design_contract():
    s = settings("http://127.0.0.1:8500", 8123, mqtt="mqtt://user:secret@broker:1883",
                 advertise_host="10.0.0.5")
    p = registration_payload(s, bundle())
    assert (p["name"], p["service_id"], p["address"], p["port"]) == \
        ("edgegen-edge", "edgegen-edge-n1-8123", "10.0.0.5", 8123)
    assert p["tags"] == ["model=tiny", f"digest={'ab' * 6}"]
    assert p["meta"] == {"node": "n1", "region": "eu", "zone": "eu-1", "lat": "52.5",
                         "lon": "13.4", "model": "tiny", "digest": "ab" * 6, "tier": "edge",
                         "max_concurrency": "3", "mqtt": "mqtt://broker:1883"}
    assert all(isinstance(v, str) for v in p["meta"].values())
    assert p["check"] == {"http": "http://10.0.0.5:8123/readyz", "interval": "2s",
                          "timeout": "1s", "DeregisterCriticalServiceAfter": "1m"}
    central = registration_payload(settings("http://c:8500", 9000, tier="central", lat=None,
                                            lon=None), bundle())
    assert (central["name"], central["service_id"]) == \
        ("edgegen-central", "edgegen-central-n1-9000")
    assert (central["meta"]["lat"], central["meta"]["lon"], central["meta"]["mqtt"]) == \
        ("", "", "")


@pytest.fixture
def ready():
    server = ReadyServer()
    yield server
    server.close()


def health(url: str, passing: bool = True) -> list[dict]:
    params = {"passing": "1"} if passing else {}
    return httpx.get(f"{url}/v1/health/service/edgegen-edge", params=params).json()


async def until(predicate, timeout: float = 20.0) -> float:
    t0 = time.monotonic()
    while not await asyncio.to_thread(predicate):
        if time.monotonic() - t0 > timeout:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.05)
    return time.monotonic() - t0


def test_registers_updates_and_deregisters(tmp_path, ready):
    proc, url = start_registry(tmp_path)

    async def scenario():
        reg = ConsulRegistration(settings(url, ready.port), bundle(), resync_interval=0.5)
        await reg.start()
        await until(lambda: len(health(url)) == 1)
        (entry,) = health(url)
        svc = entry["Service"]
        assert svc["ID"] == f"edgegen-edge-n1-{ready.port}"
        assert svc["Meta"]["digest"] == "ab" * 6 and svc["Meta"]["node"] == "n1"
        assert entry["Checks"][0]["Definition"]["HTTP"] == \
            f"http://127.0.0.1:{ready.port}/readyz"
        assert reg.registered and reg.state == "registered"

        # Hot swap: the new digest is registered and the service never leaves "passing".
        await reg.update(bundle(digest="cd" * 32))
        (entry,) = health(url)
        assert entry["Service"]["Tags"] == ["model=tiny", f"digest={'cd' * 6}"]

        # The agent stops being ready: the registry's check takes it out.
        ready.status = 503
        await until(lambda: health(url) == [])
        ready.status = 200
        await until(lambda: len(health(url)) == 1)

        t0 = time.monotonic()
        await reg.stop()
        assert time.monotonic() - t0 < 3
        assert health(url, passing=False) == []

    try:
        asyncio.run(scenario())
    finally:
        proc.stop()


def test_registry_down_at_start_then_up(tmp_path, ready, caplog):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    procs = []

    async def scenario():
        reg = ConsulRegistration(settings(url, ready.port), bundle(), resync_interval=0.5,
                                 max_backoff=0.5)
        t0 = time.monotonic()
        await reg.start()                                   # never raises, never blocks
        assert time.monotonic() - t0 < 0.5
        await asyncio.sleep(2.5)                            # several failed tries
        assert not reg.registered and reg.state == "unreachable"
        proc, _ = start_registry(tmp_path, port=port)
        procs.append(proc)
        await until(lambda: len(health(url)) == 1)
        assert reg.state == "registered"
        await reg.stop()

    caplog.set_level(logging.INFO, logger="edge_agent.registration")
    try:
        asyncio.run(scenario())
    finally:
        for p in procs:
            p.stop()
    messages = [r.getMessage() for r in caplog.records if r.name == "edge_agent.registration"]
    assert sum("unreachable" in m for m in messages) == 1, messages   # once per state change
    assert sum(m == "registered in consul" for m in messages) == 1, messages


def test_reregisters_when_the_registry_forgets_it(tmp_path, ready):
    port = free_port()
    proc, url = start_registry(tmp_path, port=port, name="r1")
    procs = [proc]

    async def scenario():
        reg = ConsulRegistration(settings(url, ready.port), bundle(), resync_interval=0.5,
                                 max_backoff=0.5)
        await reg.start()
        await until(lambda: len(health(url)) == 1)
        procs[0].stop()                                     # restart without a data dir
        proc2, _ = start_registry(tmp_path, port=port, name="r2")
        procs.append(proc2)
        await until(lambda: len(health(url)) == 1)
        await reg.stop()

    try:
        asyncio.run(scenario())
    finally:
        for p in procs:
            p.stop()


def test_stop_is_bounded_when_the_registry_is_gone(ready):
    url = f"http://127.0.0.1:{free_port()}"

    async def scenario():
        reg = ConsulRegistration(settings(url, ready.port), bundle())
        await reg.start()
        await asyncio.sleep(0.2)
        t0 = time.monotonic()
        await reg.stop(timeout=2.0)
        return time.monotonic() - t0

    assert asyncio.run(scenario()) < 3.0


def test_the_kv_client_reads_writes_and_stops_a_blocking_query_at_once(tmp_path):
    """The follower's KV client against a real registry: a write moves the index, a blocking
    read returns on a change, and an agent that stops during a blocking read exits at once.
    The read ran in a worker thread before, and the interpreter waited for it at exit: up to
    30 s, so ``edgegen agent --follow`` outlived its stop timeout and was SIGKILLed."""
    proc, url = start_registry(tmp_path)

    async def scenario():
        kv = ConsulKV(settings(url, 1), wait_s=30.0)
        assert await kv.put("edgegen/nodes/n1/desired", b"v1")
        index, value = await kv.get("edgegen/nodes/n1/desired")
        assert value == b"v1"

        async def write_soon():
            await asyncio.sleep(0.3)
            await kv.put("edgegen/nodes/n1/desired", b"v2")
        writer = asyncio.create_task(write_soon())
        new_index, value = await kv.get("edgegen/nodes/n1/desired", index)  # blocks until v2
        await writer
        assert (value, new_index > index) == (b"v2", True)

        blocked = asyncio.create_task(kv.get("edgegen/nodes/n1/desired", new_index))
        await asyncio.sleep(0.3)
        blocked.cancel()                  # the follower's stop
        await asyncio.gather(blocked, return_exceptions=True)
        await kv.close()

    async def read_from_nobody():
        kv = ConsulKV(settings(url, 1))
        try:
            await kv.get("edgegen/nodes/n1/desired")
        finally:
            await kv.close()

    try:
        t0 = time.monotonic()
        asyncio.run(scenario())           # returns only when no thread holds a query
        assert time.monotonic() - t0 < 10
    finally:
        proc.stop()
    with pytest.raises(RegistrationError, match="consul KV at"):
        asyncio.run(read_from_nobody())   # the registry is gone
