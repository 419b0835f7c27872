"""Contract tests: a real `edgegen registry` process driven with py-consul and with raw HTTP,
asserting Consul's paths, field names, headers, status codes and blocking semantics."""

from __future__ import annotations

import asyncio
import time
import uuid

import consul
import httpx
import pytest

from tests.cloud_router.registry_support import ReadyServer, start_registry
from tests.support.procs import free_port


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    proc, url = start_registry(tmp_path_factory.mktemp("registry-http"))
    yield url
    proc.stop()


@pytest.fixture(scope="module")
def client(registry):
    port = int(registry.rsplit(":", 1)[1])
    return consul.Consul(host="127.0.0.1", port=port)


@pytest.fixture
def ready():
    server = ReadyServer()
    yield server
    server.close()


def unique(prefix="svc") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def poll(fn, timeout=20.0, interval=0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = fn()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s")


def test_py_consul_registers_and_reads_back_with_consuls_fields(client, registry, ready):
    name = unique()
    assert client.agent.service.register(
        name, service_id=f"{name}-n1-80", address="127.0.0.1", port=ready.port,
        tags=["model=m", "digest=abc"], meta={"node": "n1", "region": "eu"},
        check=consul.Check.http(ready.url, "1s", timeout="1s", deregister="1m"),
    ) is True
    svc = client.agent.services()[f"{name}-n1-80"]
    assert svc["Service"] == name and svc["Port"] == ready.port
    assert svc["Tags"] == ["model=m", "digest=abc"] and svc["Meta"]["region"] == "eu"
    assert svc["Weights"] == {"Passing": 1, "Warning": 1}
    definition = client.agent.service_definition(f"{name}-n1-80")
    assert definition["ID"] == f"{name}-n1-80" and definition["ContentHash"]
    assert client.agent.service_definition("no-such-service") is None   # 404

    # The registry runs the HTTP check itself: the service turns passing.
    entries = poll(lambda: client.health.service(name, passing=True)[1])
    (entry,) = entries
    assert entry["Service"]["ID"] == f"{name}-n1-80"
    (check,) = entry["Checks"]
    assert check["CheckID"] == f"service:{name}-n1-80" and check["Status"] == "passing"
    assert check["Type"] == "http" and "200" in check["Output"]
    assert check["Definition"]["DeregisterCriticalServiceAfter"] == "1m0s"
    assert ready.hits >= 1

    index, services = client.catalog.services()
    assert int(index) >= 1 and services[name] == ["digest=abc", "model=m"]
    _, (cat,) = client.catalog.service(name)
    assert (cat["ServiceID"], cat["ServicePort"], cat["Node"], cat["ServiceMeta"]["node"]) == \
        (f"{name}-n1-80", ready.port, "n1", "n1")
    assert client.agent.service.deregister(f"{name}-n1-80") is True
    assert client.health.service(name)[1] == []


def test_health_reads_carry_consuls_headers(registry):
    r = httpx.get(f"{registry}/v1/health/service/anything")
    assert r.status_code == 200 and r.json() == []
    assert int(r.headers["X-Consul-Index"]) >= 1
    assert r.headers["X-Consul-KnownLeader"] == "true"
    assert r.headers["content-type"].startswith("application/json")
    assert httpx.get(f"{registry}/v1/status/leader").json().endswith(":8300")


def test_blocking_query_wakes_within_100ms_of_a_change(registry):
    name = unique()

    async def scenario():
        async with httpx.AsyncClient(base_url=registry, timeout=30) as c:
            first = await c.get(f"/v1/health/service/{name}")
            index = int(first.headers["X-Consul-Index"])
            waiter = asyncio.create_task(
                c.get(f"/v1/health/service/{name}", params={"index": index, "wait": "20s"}))
            await asyncio.sleep(0.5)
            assert not waiter.done(), "a blocking query with the current index must wait"
            r = await c.put("/v1/agent/service/register",
                            json={"Name": name, "ID": name, "Port": 1,
                                  "Check": {"TTL": "30s", "Status": "passing"}})
            changed_at = time.monotonic()
            assert r.status_code == 200
            woke = await waiter
            return woke, time.monotonic() - changed_at, index

    woke, latency, old_index = asyncio.run(scenario())
    assert woke.status_code == 200
    assert int(woke.headers["X-Consul-Index"]) > old_index
    assert [e["Service"]["ID"] for e in woke.json()] == [name]
    assert latency < 0.1, f"woke {latency * 1000:.0f} ms after the change"


def test_every_waiting_query_wakes_at_once(registry):
    name = unique()

    async def scenario():
        async with httpx.AsyncClient(base_url=registry, timeout=30) as c:
            index = int((await c.get("/v1/catalog/services")).headers["X-Consul-Index"])
            paths = [f"/v1/health/service/{name}", "/v1/catalog/services",
                     f"/v1/catalog/service/{name}", f"/v1/health/service/{name}"]
            waiters = [asyncio.create_task(c.get(p, params={"index": index, "wait": "20s"}))
                       for p in paths]
            await asyncio.sleep(0.5)
            await c.put("/v1/agent/service/register", json={"Name": name, "Port": 2})
            return await asyncio.wait_for(asyncio.gather(*waiters), 10)

    for r in asyncio.run(scenario()):
        assert r.status_code == 200 and name in r.text


def test_unchanged_index_returns_after_wait_with_the_same_index(registry):
    r = httpx.get(f"{registry}/v1/health/service/quiet-{uuid.uuid4().hex[:6]}")
    index = r.headers["X-Consul-Index"]
    # Any change elsewhere also moves the (global) index, so wait on an index far ahead:
    # Consul's rule is to block until the index passes the one given, or `wait` runs out.
    ahead = int(index) + 1_000_000
    t0 = time.monotonic()
    r = httpx.get(f"{registry}/v1/health/service/quiet", params={"index": ahead, "wait": "1s"},
                  timeout=10)
    elapsed = time.monotonic() - t0
    assert r.status_code == 200 and r.json() == []
    assert int(r.headers["X-Consul-Index"]) < ahead
    assert 1.0 <= elapsed < 1.0 + 1 / 16 + 2.0   # wait plus at most wait/16 of jitter


def test_unchanged_index_with_py_consul_waits(client):
    name = unique()
    index, _ = client.health.service(name)
    # Register nothing: the query holds for `wait` unless something else changes.
    t0 = time.monotonic()
    new_index, data = client.health.service(name, index=str(int(index) + 10**6), wait="1s")
    assert data == [] and time.monotonic() - t0 >= 1.0


def test_passing_hides_a_failing_service(client, ready):
    name = unique()
    failing = ReadyServer()
    failing.status = 503
    try:
        for sid, server in ((f"{name}-ok", ready), (f"{name}-bad", failing)):
            client.agent.service.register(name, service_id=sid, address="127.0.0.1",
                                          port=server.port,
                                          check=consul.Check.http(server.url, "1s", timeout="1s"))
        poll(lambda: failing.hits >= 1 and ready.hits >= 1)
        ids = poll(lambda: [e["Service"]["ID"] for e in client.health.service(name, passing=True)[1]])
        assert ids == [f"{name}-ok"]
        every = {e["Service"]["ID"]: e["Checks"][0]["Status"]
                 for e in client.health.service(name)[1]}
        assert every == {f"{name}-ok": "passing", f"{name}-bad": "critical"}
        # 429 is warning in Consul: still not "passing".
        ready.status = 429
        poll(lambda: not client.health.service(name, passing=True)[1])
        assert client.health.service(name)[1][0]["Checks"][0]["Status"] in ("warning", "critical")
    finally:
        failing.close()


def test_ttl_expiry_makes_a_service_critical(client, registry):
    name = unique()
    client.agent.service.register(name, service_id=name, port=5, check=consul.Check.ttl("1s"))
    (entry,) = client.health.service(name)[1]
    assert entry["Checks"][0]["Status"] == "critical"     # checks start critical
    assert client.agent.check.ttl_pass(f"service:{name}", notes="fine") is True
    (entry,) = client.health.service(name, passing=True)[1]
    assert entry["Checks"][0]["Output"] == "fine"
    t0 = time.monotonic()
    poll(lambda: not client.health.service(name, passing=True)[1], timeout=10)
    assert time.monotonic() - t0 < 5
    (entry,) = client.health.service(name)[1]
    assert (entry["Checks"][0]["Status"], entry["Checks"][0]["Output"]) == \
        ("critical", "TTL expired")
    r = httpx.put(f"{registry}/v1/agent/check/update/service:{name}",
                  json={"Status": "warning", "Output": "degraded"})
    assert r.status_code == 200
    assert client.health.service(name)[1][0]["Checks"][0]["Status"] == "warning"
    assert client.agent.check.ttl_warn(f"service:{name}") is True
    assert client.agent.check.ttl_fail(f"service:{name}") is True
    assert client.health.service(name)[1][0]["Checks"][0]["Status"] == "critical"


def test_deregister_critical_service_after_removes_it(registry):
    name = unique()
    r = httpx.put(f"{registry}/v1/agent/service/register", json={
        "Name": name, "ID": name, "Port": 9,
        "Check": {"TTL": "1s", "DeregisterCriticalServiceAfter": "1s", "Status": "passing"}})
    assert r.status_code == 200
    assert httpx.get(f"{registry}/v1/health/service/{name}").json() != []
    poll(lambda: httpx.get(f"{registry}/v1/health/service/{name}").json() == [], timeout=15)
    assert name not in httpx.get(f"{registry}/v1/agent/services").json()


@pytest.mark.parametrize("method,path,content,status,text", [
    ("PUT", "/v1/agent/service/register", "{not json", 400, "Request decode failed"),
    ("PUT", "/v1/agent/service/register", '{"Port": 80}', 400, "Missing service name"),
    ("PUT", "/v1/agent/service/register", '{"Name": "x", "Meta": {"a": 1}}', 400, "Meta"),
    ("PUT", "/v1/agent/check/pass/no-such-check", "", 404, "Unknown check ID"),
    ("PUT", "/v1/agent/check/update/no-such-check", '{"Status": "passing"}', 404, "Unknown"),
    ("GET", "/v1/health/service/x?index=abc", "", 400, "Invalid index"),
    ("GET", "/v1/health/service/x?index=1&wait=soon", "", 400, "Invalid wait"),
    ("GET", "/v1/health/service/x?filter=Service.Meta.a%20%3D%3D", "", 400, "expression"),
    ("GET", "/v1/agent/service/register", "", 404, ""),
])
def test_errors_are_plain_text_as_consul_gives_them(registry, method, path, content, status,
                                                    text):
    r = httpx.request(method, f"{registry}{path}", content=content)
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("text/plain")
    assert text in r.text


def test_a_bad_update_status_is_a_400(registry):
    name = unique()
    httpx.put(f"{registry}/v1/agent/service/register",
              json={"Name": name, "ID": name, "Check": {"TTL": "30s"}})
    r = httpx.put(f"{registry}/v1/agent/check/update/service:{name}", json={"Status": "fine"})
    assert (r.status_code, r.text) == (400, "Invalid check status: 'fine'")


def test_py_consul_raises_its_bad_request_for_a_bad_body(client):
    with pytest.raises(consul.ConsulException, match="400"):
        client.agent.service.register("x", check={"interval": "1s", "http": "not-a-url"})


def test_filter_and_near_over_http(client, registry):
    name = unique()
    for node, region, lat, lon in (("berlin", "eu", 52.52, 13.40), ("tokyo", "ap", 35.68, 139.69),
                                   ("paris", "eu", 48.86, 2.35)):
        client.agent.service.register(name, service_id=f"{name}-{node}", port=1,
                                      tags=[f"region={region}"],
                                      meta={"node": node, "region": region,
                                            "lat": str(lat), "lon": str(lon)})
    _, eu = client.health.service(name, filter_expr='Service.Meta.region == "eu"')
    assert sorted(e["Node"]["Node"] for e in eu) == ["berlin", "paris"]
    _, tagged = client.health.service(name, filter_expr='"region=ap" in Service.Tags')
    assert [e["Node"]["Node"] for e in tagged] == ["tokyo"]
    _, near = client.health.service(name, near="paris")
    assert [e["Node"]["Node"] for e in near] == ["paris", "berlin", "tokyo"]
    _, coords = client.coordinate.nodes()
    assert {"berlin", "paris", "tokyo"} <= {c["Node"] for c in coords}
    assert all(len(c["Coord"]["Vec"]) == 8 for c in coords)


def test_state_survives_a_restart_with_data_dir(tmp_path):
    port = free_port()
    proc, url = start_registry(tmp_path, port=port, data_dir=tmp_path / "data", name="r1")
    try:
        httpx.put(f"{url}/v1/agent/service/register",
                  json={"Name": "kept", "ID": "kept-1", "Port": 3, "Meta": {"node": "n"},
                        "Check": {"TTL": "10m", "Status": "passing"}})
        httpx.put(f"{url}/v1/agent/service/register", json={"Name": "gone", "ID": "gone-1"})
        httpx.put(f"{url}/v1/agent/service/deregister/gone-1")
        index = int(httpx.get(f"{url}/v1/health/service/kept").headers["X-Consul-Index"])
    finally:
        proc.kill()                                   # no chance to flush anything more
        proc.stop()
    proc, url = start_registry(tmp_path, port=port, data_dir=tmp_path / "data", name="r2")
    try:
        r = httpx.get(f"{url}/v1/health/service/kept", params={"passing": 1})
        assert [e["Service"]["ID"] for e in r.json()] == ["kept-1"]
        assert int(r.headers["X-Consul-Index"]) >= index      # never goes backwards
        assert "gone-1" not in httpx.get(f"{url}/v1/agent/services").json()
    finally:
        proc.stop()


def test_agent_service_supports_hash_blocking(registry):
    name = unique()
    httpx.put(f"{registry}/v1/agent/service/register", json={"Name": name, "ID": name})
    r = httpx.get(f"{registry}/v1/agent/service/{name}")
    digest = r.headers["X-Consul-ContentHash"]
    assert r.json()["ContentHash"] == digest
    # Nothing changes: the query holds for the whole `wait`, then answers the same hash.
    t0 = time.monotonic()
    same = httpx.get(f"{registry}/v1/agent/service/{name}", params={"hash": digest, "wait": "1s"},
                     timeout=10)
    elapsed = time.monotonic() - t0
    assert same.status_code == 200
    assert same.headers["X-Consul-ContentHash"] == digest
    assert 0.95 <= elapsed < 3.0, f"answered after {elapsed:.2f} s of a 1 s wait"
    assert httpx.get(f"{registry}/v1/agent/service/{name}-missing").status_code == 404


def test_a_change_to_the_service_wakes_its_hash_blocking_query(registry):
    name = unique()
    httpx.put(f"{registry}/v1/agent/service/register", json={"Name": name, "ID": name, "Port": 1})
    digest = httpx.get(f"{registry}/v1/agent/service/{name}").headers["X-Consul-ContentHash"]

    async def scenario():
        async with httpx.AsyncClient(base_url=registry, timeout=30) as c:
            waiter = asyncio.create_task(c.get(f"/v1/agent/service/{name}",
                                               params={"hash": digest, "wait": "20s"}))
            await asyncio.sleep(0.5)
            assert not waiter.done(), "a query with the current hash must wait"
            r = await c.put("/v1/agent/service/register",
                            json={"Name": name, "ID": name, "Port": 2})
            changed_at = time.monotonic()
            assert r.status_code == 200
            woke = await asyncio.wait_for(waiter, 10)
            return woke, time.monotonic() - changed_at

    woke, latency = asyncio.run(scenario())
    assert woke.status_code == 200 and woke.json()["Port"] == 2
    new_digest = woke.headers["X-Consul-ContentHash"]
    assert new_digest != digest and woke.json()["ContentHash"] == new_digest
    assert latency < 1.0, f"woke {latency * 1000:.0f} ms after the change"


