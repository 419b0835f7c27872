"""The registry's pure parts on plain data: definitions, state machine, filters, coordinates,
journal replay. Time is a number passed in, so TTL expiry and reaping are exact."""

import json

import pytest

from cloud_router.errors import InvalidRequest, NotFound
from cloud_router.registry import queries, views
from cloud_router.registry.coordinates import coordinate_from_location, rtt_seconds
from cloud_router.registry.definitions import format_duration, parse_duration, parse_service
from cloud_router.registry.filtering import compile_filter
from cloud_router.registry.journal import Journal
from cloud_router.registry.state import RegistryState


def body(sid="web-1", name="web", *, check=None, meta=None, tags=None, port=8080):
    b = {"ID": sid, "Name": name, "Address": "127.0.0.1", "Port": port,
         "Tags": tags or ["model=m"], "Meta": meta or {"node": sid}}
    if check is not None:
        b["Check"] = check
    return b


@pytest.mark.parametrize("text,seconds", [
    ("10s", 10), ("1m", 60), ("1m30s", 90), ("500ms", 0.5), ("1.5h", 5400), ("0", 0),
    ("2s", 2), (1_000_000_000, 1.0),
])
def test_go_durations_parse(text, seconds):
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("bad", ["10", "ten seconds", "1x", "s", True, [1]])
def test_bad_durations_are_invalid_requests(bad):
    with pytest.raises(InvalidRequest):
        parse_duration(bad)


def test_durations_print_as_go_does():
    assert [format_duration(s) for s in (0, 2, 60, 90, 0.5, 3600)] == \
        ["0s", "2s", "1m0s", "1m30s", "500ms", "1h0m0s"]


def test_py_consul_lowercase_and_snake_case_keys_parse_like_camel_case():
    camel = parse_service({"Name": "web", "ID": "w", "Port": 1, "Check": {
        "HTTP": "http://x/readyz", "Interval": "2s", "Timeout": "1s",
        "DeregisterCriticalServiceAfter": "1m"}})
    lower = parse_service({"name": "web", "id": "w", "port": 1, "checks": [{
        "http": "http://x/readyz", "interval": "2s", "timeout": "1s",
        "deregister_critical_service_after": "1m"}]})
    assert camel == lower
    c = camel.checks[0]
    assert (c.check_id, c.kind, c.interval, c.timeout, c.deregister_after) == \
        ("service:w", "http", 2.0, 1.0, 60.0)
    assert c.name == "Service 'web' check"


@pytest.mark.parametrize("bad,message", [
    ({"Port": 1}, "Missing service name"),
    ({"Name": "w", "Port": "80"}, "Port"),
    ({"Name": "w", "Meta": {"lat": 1.5}}, "Meta"),
    ({"Name": "w", "Tags": "a"}, "Tags"),
    ({"Name": "w", "Check": {"HTTP": "http://x"}}, "Interval"),
    ({"Name": "w", "Check": {"TTL": "0s"}}, "TTL"),
    ({"Name": "w", "Check": {"Args": ["/bin/true"], "Interval": "1s"}}, "HTTP and TTL"),
    ({"Name": "w", "Check": {"TTL": "1s", "Status": "great"}}, "status"),
    ([], "object"),
])
def test_bad_bodies_name_the_problem(bad, message):
    with pytest.raises(InvalidRequest, match=message):
        parse_service(bad)


def test_index_only_grows_and_counts_every_change():
    s = RegistryState()
    seen = [s.index]
    s.register(body(check={"TTL": "5s"}), now=0)
    seen.append(s.index)
    s.update_ttl("service:web-1", "passing", "ok", now=1)
    seen.append(s.index)
    s.update_ttl("service:web-1", "passing", "still ok", now=2)   # no status change
    seen.append(s.index)
    s.deregister("web-1")
    seen.append(s.index)
    assert seen == [1, 2, 3, 3, 4]
    assert s.deregister("web-1") is None and s.index == 4   # unknown ID: no-op


def test_checks_start_critical_and_passing_hides_failing_services():
    s = RegistryState()
    s.register(body("a", check={"TTL": "5s"}), now=0)
    s.register(body("b", check={"TTL": "5s"}), now=0)
    assert queries.health_service(s, "web", passing=True) == []
    s.update_ttl("service:a", "passing", "", now=1)
    s.update_ttl("service:b", "warning", "", now=1)
    ids = [e["Service"]["ID"] for e in queries.health_service(s, "web", passing=True)]
    assert ids == ["a"]
    assert len(queries.health_service(s, "web")) == 2


def test_ttl_expiry_makes_the_check_critical():
    s = RegistryState()
    s.register(body(check={"TTL": "2s"}), now=0)
    s.update_ttl("service:web-1", "passing", "", now=1)
    assert s.tick(2.9) == []
    records = s.tick(3.0)
    assert [(r["op"], r["status"], r["output"]) for r in records] == \
        [("status", "critical", "TTL expired")]
    assert s.checks["service:web-1"].status == "critical"


def test_deregister_critical_service_after_removes_the_service():
    s = RegistryState(min_deregister_after=0)
    s.register(body(check={"TTL": "1s", "DeregisterCriticalServiceAfter": "3s"}), now=0)
    s.update_ttl("service:web-1", "passing", "", now=0)
    s.tick(1.0)                         # TTL expired: critical since t=1
    assert "web-1" in s.services
    assert [r["op"] for r in s.tick(3.9)] == []
    assert [r["op"] for r in s.tick(4.0)] == ["deregister"]
    assert "web-1" not in s.services and s.checks == {}


def test_consuls_one_minute_floor_applies_by_default():
    s = RegistryState()
    s.register(body(check={"TTL": "1s", "DeregisterCriticalServiceAfter": "1s"}), now=0)
    s.tick(30)
    assert "web-1" in s.services
    s.tick(61)
    assert "web-1" not in s.services


def test_reregistering_keeps_check_status_so_an_update_does_not_flap():
    s = RegistryState()
    s.register(body(check={"TTL": "5s"}), now=0)
    s.update_ttl("service:web-1", "passing", "", now=1)
    s.register(body(check={"TTL": "5s"}, tags=["model=m", "digest=new"]), now=2)
    assert s.checks["service:web-1"].status == "passing"
    assert s.services["web-1"].definition.tags == ("model=m", "digest=new")


def test_unknown_check_is_not_found_and_non_ttl_check_is_refused():
    s = RegistryState()
    s.register(body(check={"HTTP": "http://127.0.0.1:1/readyz", "Interval": "2s"}), now=0)
    with pytest.raises(NotFound):
        s.update_ttl("nope", "passing", "", now=0)
    with pytest.raises(InvalidRequest, match="TTL"):
        s.update_ttl("service:web-1", "passing", "", now=0)
    with pytest.raises(InvalidRequest):
        s.register(body("other", check={"CheckID": "service:web-1", "TTL": "1s"}), now=0)


def test_health_entry_uses_consuls_field_names():
    s = RegistryState()
    s.register(body(check={"TTL": "5s"}, meta={"node": "n1", "model": "m"}), now=0)
    (entry,) = queries.health_service(s, "web")
    assert set(entry) == {"Node", "Service", "Checks"}
    assert {"ID", "Node", "Address", "Datacenter", "TaggedAddresses", "Meta"} <= set(entry["Node"])
    assert entry["Node"]["Node"] == "n1"
    assert {"ID", "Service", "Tags", "Meta", "Port", "Address", "Weights",
            "EnableTagOverride", "CreateIndex", "ModifyIndex"} <= set(entry["Service"])
    (check,) = entry["Checks"]
    assert {"Node", "CheckID", "Name", "Status", "Notes", "Output", "ServiceID",
            "ServiceName", "ServiceTags", "Type", "CreateIndex", "ModifyIndex"} <= set(check)
    assert (check["Status"], check["Type"], check["ServiceName"]) == ("critical", "ttl", "web")
    assert views.catalog_services(s) == {"web": ["model=m"]}


@pytest.mark.parametrize("expr,ids", [
    ('Service.Meta.region == "eu"', ["a"]),
    ('Service.Meta.region != "eu"', ["b"]),
    ('"model=x" in Service.Tags', ["b"]),
    ('Service.Tags contains "model=m"', ["a"]),
    ('"model=x" not in Service.Tags', ["a"]),
    ('Service.Meta.zone is empty', ["b"]),
    ('Service.Meta.region == "eu" or Service.Port == 2', ["a", "b"]),
    ('not (Service.Meta.region == eu) and Service.ID matches "^b$"', ["b"]),
])
def test_filter_expressions(expr, ids):
    s = RegistryState()
    s.register(body("a", meta={"node": "a", "region": "eu", "zone": "eu-1"}, port=1), now=0)
    s.register(body("b", meta={"node": "b", "region": "us"}, tags=["model=x"], port=2), now=0)
    got = [e["Service"]["ID"] for e in
           queries.health_service(s, "web", predicate=compile_filter(expr))]
    assert got == ids


@pytest.mark.parametrize("expr", ['Service.Meta.x ==', '(a == "b"', 'a ~ b', '== x', '"a" in'])
def test_malformed_filters_are_invalid_requests(expr):
    with pytest.raises(InvalidRequest, match="boolean expression"):
        compile_filter(expr)


def test_near_sorts_by_estimated_rtt_from_the_named_node():
    s = RegistryState()
    places = {"berlin": (52.52, 13.40), "paris": (48.86, 2.35), "tokyo": (35.68, 139.69)}
    for node, (lat, lon) in places.items():
        s.register(body(node, meta={"node": node, "lat": str(lat), "lon": str(lon)}), now=0)
    s.register(body("nowhere", meta={"node": "nowhere"}), now=0)
    order = [e["Node"]["Node"] for e in queries.health_service(s, "web", near="paris")]
    assert order == ["paris", "berlin", "tokyo", "nowhere"]
    # Berlin-Paris is ~880 km: light in fibre needs ~8.8 ms for the round trip.
    rtt = rtt_seconds(coordinate_from_location(*places["berlin"]),
                      coordinate_from_location(*places["paris"]))
    assert 0.008 < rtt < 0.0095
    assert [c["Node"] for c in queries.coordinate_nodes(s)] == ["berlin", "paris", "tokyo"]


def test_journal_replay_rebuilds_the_same_state(tmp_path):
    s = RegistryState(min_deregister_after=0)
    j = Journal(tmp_path)
    j.rewrite([])
    for rec in [s.register(body("a", check={"TTL": "5s"}), now=0),
                s.register(body("b", check={"TTL": "5s"}), now=0),
                s.update_ttl("service:a", "passing", "ok", now=1),
                s.deregister("b")]:
        j.append(rec)
    j.close()
    with open(tmp_path / "registry.jsonl", "a") as f:
        f.write('{"op": "register", "torn')           # a crash mid-write
    again = RegistryState()
    for rec in Journal(tmp_path).read():
        again.apply(rec, now=100)
    assert again.index == s.index
    assert set(again.services) == {"a"}
    assert again.checks["service:a"].status == "passing"
    snap = again.snapshot()
    third = RegistryState()
    for rec in json.loads(json.dumps(snap)):
        third.apply(rec, now=0)
    assert (third.index, set(third.services), third.checks["service:a"].status) == \
        (s.index, {"a"}, "passing")


def test_runtime_compacts_the_journal_and_replays_it(tmp_path, monkeypatch):
    import asyncio

    from cloud_router.registry import runtime

    monkeypatch.setattr(runtime, "COMPACT_AFTER", 5)

    async def first():
        reg = runtime.Registry(tmp_path)
        await reg.start()
        reg.register(body("a", check={"TTL": "1h"}))
        for i in range(12):
            reg.update_ttl("service:a", "passing" if i % 2 == 0 else "critical", str(i))
        await reg.stop()
        return reg.state.index, reg.state.checks["service:a"].status

    index, status = asyncio.run(first())
    lines = (tmp_path / "registry.jsonl").read_text().splitlines()
    assert len(lines) < 8, "compaction keeps the file small"

    async def second():
        reg = runtime.Registry(tmp_path)
        await reg.start()
        try:
            return reg.state.index, reg.state.checks["service:a"].status
        finally:
            await reg.stop()

    assert asyncio.run(second()) == (index, status)
