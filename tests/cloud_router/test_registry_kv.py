"""Consul's KV store in the embedded registry (api-docs/kv.mdx): the pure rules on tables
(cas, keys with a separator, key and parameter checks, journal replay, KeyWritePrefix), then
a real `edgegen registry` process driven with raw HTTP and with py-consul, as a client of a
real Consul would drive it, with and without ACLs."""

from __future__ import annotations

import asyncio
import base64
import json
import time
import uuid

import consul
import httpx
import pytest

from cloud_router.errors import InvalidRequest, ValueTooLarge
from cloud_router.registry import kv
from cloud_router.registry.acl import allows_prefix_write, parse_acl
from cloud_router.registry.state import RegistryState
from tests.cloud_router.registry_support import start_registry
from tests.support.procs import free_port

# ---- pure: the state machine and the rules -----------------------------------------------------


def put(state: RegistryState, key: str, value: bytes | None = b"v", **kw) -> bool:
    return state.kv_put(key, value, **kw) is not None


@pytest.mark.parametrize("exists, cas, written", [
    (False, None, True),
    (False, 0, True),          # cas=0: only if the key does not exist
    (True, 0, False),
    (False, 5, False),         # cas=N on a missing key: no ModifyIndex to match
    (True, "current", True),
    (True, "stale", False),
])
def test_put_check_and_set(exists, cas, written):
    state = RegistryState()
    if exists:
        put(state, "k", b"old")
        put(state, "k", b"older")   # a ModifyIndex above the CreateIndex
    current = state.kv.get("k").modify_index if exists else 0
    cas = {"current": current, "stale": current - 1}.get(cas, cas)
    index = state.index
    assert put(state, "k", b"new", cas=cas) is written
    entry = state.kv.get("k")
    if written:
        assert entry.value == b"new" and entry.modify_index == state.index == index + 1
    else:
        assert state.index == index and (entry is None or entry.value == b"older")


@pytest.mark.parametrize("exists, cas, recurse, answer, deleted", [
    (True, None, False, True, True),
    (False, None, False, True, False),
    (True, 0, False, False, False),        # "a 0 index will not delete the key"
    (True, "current", False, True, True),
    (True, "stale", False, False, False),
    (False, 7, False, True, False),        # already gone: Consul answers true
    (True, None, True, True, True),
])
def test_delete_check_and_set(exists, cas, recurse, answer, deleted):
    state = RegistryState()
    put(state, "keep/x")
    if exists:
        put(state, "k/a")
    current = state.kv.get("k/a").modify_index if exists else 0
    cas = {"current": current, "stale": current - 1}.get(cas, cas)
    index = state.index
    ok, record = state.kv_delete("k/" if recurse else "k/a", recurse=recurse, cas=cas)
    assert ok is answer and (record is not None) is deleted
    assert (state.kv.get("k/a") is None) is (deleted or not exists)
    assert state.index == index + deleted and state.kv.get("keep/x") is not None


def test_a_put_keeps_the_create_index_and_an_empty_value_is_null():
    state = RegistryState()
    put(state, "a", b"1", flags=42)
    created = state.kv.get("a").create_index
    put(state, "a", None)
    entry = state.kv.get("a")
    assert (entry.create_index, entry.modify_index, entry.flags) == (created, state.index, 0)
    assert kv.entry_json(entry) == {"LockIndex": 0, "Key": "a", "Flags": 0, "Value": None,
                                    "CreateIndex": created, "ModifyIndex": state.index}
    put(state, "a", b"\x00\xff", flags=2**64 - 1)
    assert kv.entry_json(state.kv.get("a"))["Value"] == base64.b64encode(b"\x00\xff").decode()


KEYS = ["web/bar", "web/foo", "web/subdir/a", "web/subdir/b", "web/subdir2/c", "webby", "x"]


@pytest.mark.parametrize("prefix, separator, names", [
    ("web/", "/", ["web/bar", "web/foo", "web/subdir/", "web/subdir2/"]),   # kv.mdx's example
    ("web/", "", ["web/bar", "web/foo", "web/subdir/a", "web/subdir/b", "web/subdir2/c"]),
    ("web", "/", ["web/", "webby"]),
    ("", "/", ["web/", "webby", "x"]),
    ("web/subdir/", "/", ["web/subdir/a", "web/subdir/b"]),
    ("nothing/", "/", []),
])
def test_key_names_with_a_separator(prefix, separator, names):
    state = RegistryState()
    for k in KEYS:
        put(state, k)
    assert kv.key_names(state.kv.under(prefix), prefix, separator) == names


@pytest.mark.parametrize("key, required, error", [
    ("edgegen/rollout/wave-1", True, None),
    ("dir/", True, None),
    ("a.b,c-d_e f", True, None),
    ("", False, None),                     # a listing of everything
    ("", True, "Missing key name"),
    ("/edgegen/x", True, "must not begin with a '/'"),
    ("a//b", True, "path segment"),
    ("a/../b", True, "path segment"),
    ("a/./b", True, "path segment"),
    ("..", True, "path segment"),
    ("a\nb", True, "not printable"),
    ("a\u00a0b", True, "not printable"),   # as Go's unicode.IsPrint
])
def test_keys(key, required, error):
    if error is None:
        kv.check_key(key, required=required)
    else:
        with pytest.raises(InvalidRequest, match=error):
            kv.check_key(key, required=required)


@pytest.mark.parametrize("options, key, query, expected", [
    (kv.write_options, "k", {}, (0, None)),
    (kv.write_options, "k", {"flags": "7", "cas": "0"}, (7, 0)),
    (kv.write_options, "k", {"flags": str(2**64 - 1)}, (2**64 - 1, None)),
    (kv.write_options, "k", {"flags": str(2**64)}, "unsigned 64-bit"),
    (kv.write_options, "k", {"flags": "-1"}, "unsigned 64-bit"),
    (kv.write_options, "k", {"cas": "abc"}, "unsigned 64-bit"),
    (kv.write_options, "k", {"cas": ""}, "unsigned 64-bit"),
    (kv.write_options, "k", {"cas": "1_0"}, "unsigned 64-bit"),
    (kv.write_options, "k", {"acquire": "sess"}, "sessions"),
    (kv.write_options, "k", {"release": "sess"}, "sessions"),
    (kv.write_options, "k", {"cas": "1", "acquire": "s"}, "Conflicting flags"),
    (kv.write_options, "", {}, "Missing key name"),
    (kv.delete_options, "k", {}, (False, None)),
    (kv.delete_options, "", {"recurse": ""}, (True, None)),
    (kv.delete_options, "k", {"cas": "3"}, (False, 3)),
    (kv.delete_options, "k", {"recurse": "", "cas": "3"}, "Conflicting flags"),
    (kv.delete_options, "", {}, "Missing key name"),
    (kv.read_options, "k", {}, kv.ReadOptions(False, False, False, "")),
    (kv.read_options, "", {"recurse": "false"}, kv.ReadOptions(True, False, False, "")),
    (kv.read_options, "p", {"keys": "", "seperator": "/"}, kv.ReadOptions(False, True, False, "/")),
    (kv.read_options, "p", {"keys": "", "separator": "-", "seperator": "/"},
     kv.ReadOptions(False, True, False, "-")),
    (kv.read_options, "", {"raw": ""}, "Missing key name"),
])
def test_query_parameters(options, key, query, expected):
    if isinstance(expected, str):
        with pytest.raises(InvalidRequest, match=expected):
            options(key, query)
    else:
        assert options(key, query) == expected


def test_values_up_to_512_kib():
    kv.check_size(512 * 1024)
    with pytest.raises(ValueTooLarge, match=r"Request body\(524289 bytes\) too large, max "
                                            r"size: 524288 bytes") as e:
        kv.check_size(512 * 1024 + 1)
    assert e.value.status_code == 413


def test_the_journal_rebuilds_the_store_with_its_indexes():
    state = RegistryState()
    records = [state.register({"Name": "web", "ID": "web-1"}, 0.0)]
    for key in ("a/1", "a/2", "b/1", "b/2"):
        records.append(state.kv_put(key, key.encode(), flags=3))
    records.append(state.kv_put("a/1", None))
    records.append(state.kv_delete("b/1")[1])
    records.append(state.kv_delete("a/", recurse=True)[1])
    records.append(state.kv_put("a/3", b"\x00"))

    def dump(s: RegistryState):
        return [kv.entry_json(e) for e in s.kv.under("")], s.kv.index, s.index

    replayed, compacted = RegistryState(), RegistryState()
    for rec in json.loads(json.dumps(records)):       # as the journal file holds them
        replayed.apply(rec, 0.0)
    for rec in json.loads(json.dumps(state.snapshot())):
        compacted.apply(rec, 0.0)
    assert dump(replayed) == dump(compacted) == dump(state)
    assert [e.key for e in state.kv.under("")] == ["a/3", "b/2"]


RULES = {"key_prefix": {"edgegen/": {"policy": "write"}, "edgegen/locked/": {"policy": "read"},
                        "other/": {"policy": "write"}},
         "key": {"other/pinned": {"policy": "deny"}, "edgegen/free/exact": {"policy": "write"}}}


@pytest.mark.parametrize("default, prefix, allowed", [
    ("deny", "edgegen/rollout/", True),
    ("deny", "edgegen/free/", True),          # write rules under it are fine
    ("deny", "edgegen/", False),              # edgegen/locked/ under it is read only
    ("deny", "edgegen/locked/x", False),
    ("deny", "other/", False),                # an exact deny under it
    ("deny", "other/p", False),
    ("deny", "other/q", True),
    ("deny", "", False),
    ("deny", "unruled/", False),              # no rule: the default policy
    ("allow", "unruled/", True),
])
def test_delete_recurse_needs_write_on_the_whole_prefix(default, prefix, allowed):
    acl = parse_acl({"default_policy": default,
                     "tokens": [{"secret_id": "s" * 16, "rules": RULES}]})
    assert allows_prefix_write(acl, acl.resolve("s" * 16), "key", prefix) is allowed


# ---- a real registry, raw HTTP -----------------------------------------------------------------


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    proc, url = start_registry(tmp_path_factory.mktemp("registry-kv"))
    yield url
    proc.stop()


def unique(prefix: str = "edgegen/test") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}/"


def test_a_missing_key_is_a_404_with_an_index(registry):
    r = httpx.get(f"{registry}/v1/kv/{unique()}missing")
    assert (r.status_code, r.content) == (404, b"")
    assert int(r.headers["X-Consul-Index"]) >= 1
    assert r.headers["X-Consul-KnownLeader"] == "true" and r.headers["X-Consul-LastContact"] == "0"


def test_put_get_raw_flags_and_consuls_fields(registry):
    key = unique() + "config"
    value = bytes(range(256))
    r = httpx.put(f"{registry}/v1/kv/{key}", content=value, params={"flags": 9})
    assert (r.status_code, r.json()) == (200, True)
    r = httpx.get(f"{registry}/v1/kv/{key}")
    (entry,) = r.json()
    assert list(entry) == ["LockIndex", "Key", "Flags", "Value", "CreateIndex", "ModifyIndex"]
    assert (entry["Key"], entry["Flags"], entry["LockIndex"]) == (key, 9, 0)
    assert base64.b64decode(entry["Value"]) == value
    assert int(r.headers["X-Consul-Index"]) == entry["ModifyIndex"] == entry["CreateIndex"]
    raw = httpx.get(f"{registry}/v1/kv/{key}", params={"raw": ""})
    assert raw.content == value and raw.headers["content-type"] == "text/plain"
    assert raw.headers["x-content-type-options"] == "nosniff"
    assert httpx.put(f"{registry}/v1/kv/{key}").json() is True     # no body: a null value
    (entry,) = httpx.get(f"{registry}/v1/kv/{key}").json()
    assert entry["Value"] is None and entry["Flags"] == 0 and entry["ModifyIndex"] > \
        entry["CreateIndex"]
    assert httpx.get(f"{registry}/v1/kv/{key}", params={"raw": ""}).content == b""


def test_cas_over_http(registry):
    key = unique() + "lock"
    url = f"{registry}/v1/kv/{key}"
    assert httpx.put(url, content=b"1", params={"cas": 0}).json() is True
    assert httpx.put(url, content=b"2", params={"cas": 0}).json() is False   # exists
    (entry,) = httpx.get(url).json()
    index = entry["ModifyIndex"]
    assert httpx.put(url, content=b"3", params={"cas": index}).json() is True
    assert httpx.put(url, content=b"4", params={"cas": index}).json() is False   # stale
    assert base64.b64decode(httpx.get(url).json()[0]["Value"]) == b"3"
    assert httpx.delete(url, params={"cas": index}).json() is False
    assert httpx.delete(url, params={"cas": httpx.get(url).json()[0]["ModifyIndex"]}).json()
    assert httpx.get(url).status_code == 404


def test_recurse_keys_and_delete_recurse(registry):
    base = unique()
    for k in ("bar", "foo", "subdir/a", "subdir/b"):
        assert httpx.put(f"{registry}/v1/kv/{base}{k}", content=k.encode()).json() is True
    httpx.put(f"{registry}/v1/kv/{base[:-1]}-sibling", content=b"s")
    r = httpx.get(f"{registry}/v1/kv/{base}", params={"recurse": ""})
    assert [e["Key"] for e in r.json()] == [base + k for k in ("bar", "foo", "subdir/a",
                                                               "subdir/b")]
    assert int(r.headers["X-Consul-Index"]) >= max(e["ModifyIndex"] for e in r.json())
    r = httpx.get(f"{registry}/v1/kv/{base}", params={"keys": "", "separator": "/"})
    assert r.json() == [base + "bar", base + "foo", base + "subdir/"]
    assert httpx.get(f"{registry}/v1/kv/{base}subdir/", params={"keys": ""}).json() == \
        [base + "subdir/a", base + "subdir/b"]
    assert httpx.get(f"{registry}/v1/kv/{base}nothing/", params={"keys": ""}).status_code == 404
    assert httpx.get(f"{registry}/v1/kv/{base}nothing/", params={"recurse": ""}).status_code \
        == 404
    assert httpx.delete(f"{registry}/v1/kv/{base}subdir/", params={"recurse": ""}).json()
    assert httpx.get(f"{registry}/v1/kv/{base}", params={"keys": ""}).json() == \
        [base + "bar", base + "foo"]
    assert httpx.delete(f"{registry}/v1/kv/{base}foo").json() is True
    assert httpx.delete(f"{registry}/v1/kv/{base}", params={"recurse": ""}).json() is True
    assert httpx.get(f"{registry}/v1/kv/{base}", params={"recurse": ""}).status_code == 404
    assert httpx.get(f"{registry}/v1/kv/{base[:-1]}-sibling").status_code == 200


@pytest.mark.parametrize("method, path, params, content, status, text", [
    ("GET", "/v1/kv/", {}, None, 400, "Missing key name"),
    ("PUT", "/v1/kv/", {}, b"x", 400, "Missing key name"),
    ("DELETE", "/v1/kv/", {}, None, 400, "Missing key name"),
    ("PUT", "/v1/kv//edgegen/x", {}, b"x", 400, "must not begin with a '/'"),
    ("PUT", "/v1/kv/edgegen/x", {"flags": "abc"}, b"x", 400, "?flags='abc'"),
    ("PUT", "/v1/kv/edgegen/x", {"cas": "-1"}, b"x", 400, "?cas='-1'"),
    ("PUT", "/v1/kv/edgegen/x", {"acquire": "s1"}, b"x", 400, "sessions"),
    ("DELETE", "/v1/kv/edgegen/x", {"recurse": "", "cas": "1"}, None, 400, "Conflicting"),
    ("GET", "/v1/kv/edgegen/x", {"index": "soon"}, None, 400, "Invalid index"),
    ("PUT", "/v1/kv/edgegen/big", {}, b"x" * (512 * 1024 + 1), 413, "too large"),
    ("POST", "/v1/kv/edgegen/x", {}, b"x", 405, "method POST not allowed"),
])
def test_bad_requests_get_consuls_status_and_a_message(registry, method, path, params,
                                                       content, status, text):
    r = httpx.request(method, registry + path, params=params, content=content)
    assert r.status_code == status and text in r.text, r.text


def test_a_value_of_512_kib_is_accepted_and_a_larger_chunked_one_is_not(registry):
    key = unique() + "big"
    assert httpx.put(f"{registry}/v1/kv/{key}", content=b"x" * 512 * 1024).json() is True

    def chunks():   # no Content-Length: the registry counts as it reads
        for _ in range(513):
            yield b"y" * 1024

    r = httpx.put(f"{registry}/v1/kv/{key}", content=chunks())
    assert r.status_code == 413
    assert len(base64.b64decode(httpx.get(f"{registry}/v1/kv/{key}").json()[0]["Value"])) \
        == 512 * 1024


def test_a_blocking_read_returns_when_its_key_changes_not_before(registry):
    key = unique() + "desired"

    async def scenario():
        async with httpx.AsyncClient(base_url=registry, timeout=30) as c:
            await c.put(f"/v1/kv/{key}", content=b"v1")
            first = await c.get(f"/v1/kv/{key}")
            index = int(first.headers["X-Consul-Index"])
            waiter = asyncio.create_task(
                c.get(f"/v1/kv/{key}", params={"index": index, "wait": "20s"}))
            # Other changes move the registry's index but not this key's: no early return.
            await c.put(f"/v1/kv/{key}-other", content=b"x")
            await c.put("/v1/agent/service/register", json={"Name": unique("svc")[:-1]})
            await asyncio.sleep(0.5)
            assert not waiter.done(), "a blocking read must wait for its own key"
            await c.put(f"/v1/kv/{key}", content=b"v2")
            changed_at = time.monotonic()
            woke = await waiter
            return woke, time.monotonic() - changed_at, index

    woke, latency, old_index = asyncio.run(scenario())
    (entry,) = woke.json()
    assert base64.b64decode(entry["Value"]) == b"v2"
    assert int(woke.headers["X-Consul-Index"]) == entry["ModifyIndex"] > old_index
    assert latency < 0.1, f"woke {latency * 1000:.0f} ms after the change"


def test_a_blocking_listing_returns_when_a_key_under_it_is_deleted(registry):
    base = unique()
    httpx.put(f"{registry}/v1/kv/{base}a", content=b"1")
    httpx.put(f"{registry}/v1/kv/{base}b", content=b"2")
    index = httpx.get(f"{registry}/v1/kv/{base}", params={"recurse": ""}).headers[
        "X-Consul-Index"]

    async def scenario():
        async with httpx.AsyncClient(base_url=registry, timeout=30) as c:
            waiter = asyncio.create_task(c.get(f"/v1/kv/{base}", params={
                "recurse": "", "index": index, "wait": "20s"}))
            await asyncio.sleep(0.3)
            assert not waiter.done()
            await c.delete(f"/v1/kv/{base}b")   # the highest ModifyIndex goes away
            return await waiter

    woke = asyncio.run(scenario())
    assert [e["Key"] for e in woke.json()] == [base + "a"]
    assert int(woke.headers["X-Consul-Index"]) > int(index)   # never goes backwards


def test_an_unchanged_key_holds_for_wait_and_answers_the_same_index(registry):
    key = unique() + "quiet"
    httpx.put(f"{registry}/v1/kv/{key}", content=b"q")
    index = httpx.get(f"{registry}/v1/kv/{key}").headers["X-Consul-Index"]
    httpx.put(f"{registry}/v1/kv/{key}-elsewhere", content=b"x")   # moves the global index
    t0 = time.monotonic()
    r = httpx.get(f"{registry}/v1/kv/{key}", params={"index": index, "wait": "1s"}, timeout=10)
    elapsed = time.monotonic() - t0
    assert r.status_code == 200 and r.headers["X-Consul-Index"] == index
    assert 1.0 <= elapsed < 1.0 + 1 / 16 + 2.0   # wait plus at most wait/16 of jitter


def test_py_consul_uses_the_kv_store_as_it_uses_consuls(registry):
    port = int(registry.rsplit(":", 1)[1])
    c = consul.Consul(host="127.0.0.1", port=port)
    base = unique("edgegen/rollout")
    assert c.kv.put(base + "wave", "1", cas=0) is True
    assert c.kv.put(base + "wave", "2", cas=0) is False
    index, entry = c.kv.get(base + "wave")
    assert entry["Value"] == b"1" and entry["Key"] == base + "wave"
    assert int(index) == entry["ModifyIndex"]
    assert c.kv.put(base + "agents/a1", b"\x00ready", flags=5) is True
    _, entries = c.kv.get(base, recurse=True)
    assert [(e["Key"], e["Value"], e["Flags"]) for e in entries] == [
        (base + "agents/a1", b"\x00ready", 5), (base + "wave", b"1", 0)]
    _, keys = c.kv.get(base, keys=True, separator="/")
    assert keys == [base + "agents/", base + "wave"]
    assert c.kv.get(base + "missing")[1] is None
    # A blocking read that times out returns the same index; one that sees a change returns
    # the new one.
    t0 = time.monotonic()
    same, entry = c.kv.get(base + "wave", index=index, wait="1s")
    assert same == index and entry["Value"] == b"1" and time.monotonic() - t0 >= 1.0
    assert c.kv.put(base + "wave", "3", cas=entry["ModifyIndex"]) is True
    newer, entry = c.kv.get(base + "wave", index=index, wait="5s")
    assert int(newer) > int(index) and entry["Value"] == b"3"
    assert c.kv.delete(base + "wave") is True
    assert c.kv.get(base + "wave")[1] is None
    assert c.kv.delete(base, recurse=True) is True
    assert c.kv.get(base, recurse=True)[1] is None


def test_the_kv_store_survives_a_restart_with_data_dir(tmp_path):
    port = free_port()
    data = tmp_path / "data"
    proc, url = start_registry(tmp_path, port=port, data_dir=data, name="r1")
    try:
        httpx.put(f"{url}/v1/kv/edgegen/a", content=b"1", params={"flags": 4})
        httpx.put(f"{url}/v1/kv/edgegen/a", content=b"2")
        httpx.put(f"{url}/v1/kv/edgegen/gone", content=b"x")
        httpx.delete(f"{url}/v1/kv/edgegen/gone")
        before = httpx.get(f"{url}/v1/kv/edgegen/", params={"recurse": ""})
    finally:
        proc.kill()                                   # no chance to flush anything more
        proc.stop()
    for name in ("r2", "r3"):   # r2 replays the journal and compacts it; r3 reads the snapshot
        proc, url = start_registry(tmp_path, port=port, data_dir=data, name=name)
        try:
            after = httpx.get(f"{url}/v1/kv/edgegen/", params={"recurse": ""})
            assert after.json() == before.json()
            assert int(after.headers["X-Consul-Index"]) >= int(before.headers["X-Consul-Index"])
            assert httpx.get(f"{url}/v1/kv/edgegen/gone").status_code == 404
        finally:
            proc.stop()


# ---- a real registry with ACLs -----------------------------------------------------------------

WRITER = "wwwwwwww-bbbb-4ccc-8ddd-eeeeeeeeeeee"     # write on edgegen/, read on edgegen/locked/
READER = "rrrrrrrr-bbbb-4ccc-8ddd-eeeeeeeeeeee"     # read on edgegen/, but not edgegen/secret
MANAGEMENT = "mmmmmmmm-bbbb-4ccc-8ddd-eeeeeeeeeeee"
READER_ACCESSOR = "0a0a0a0a-0000-4000-8000-000000000009"
SECRET = '"edgegen/secret"'
ACL = {"default_policy": "deny", "tokens": [
    {"secret_id": MANAGEMENT, "management": True},
    {"secret_id": WRITER, "rules": {"key_prefix": {"edgegen/": {"policy": "write"},
                                                   "edgegen/locked/": {"policy": "read"}}}},
    {"secret_id": READER, "accessor_id": READER_ACCESSOR,
     "rules": {"key_prefix": {"edgegen/": {"policy": "read"}},
               "key": {"edgegen/secret": {"policy": "deny"}}}},
]}


@pytest.fixture(scope="module")
def acl_registry(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("registry-kv-acl")
    acl_file = tmp / "acl.json"
    acl_file.write_text(json.dumps(ACL))
    acl_file.chmod(0o600)
    proc, url = start_registry(tmp, acl_file=acl_file)
    for key in ("edgegen/a", "edgegen/secret", "edgegen/locked/l", "private/p"):
        r = httpx.put(f"{url}/v1/kv/{key}", content=b"v", headers={"X-Consul-Token": MANAGEMENT})
        assert r.json() is True
    yield url
    proc.stop()


@pytest.mark.parametrize("method, key, params, token, status, text", [
    ("GET", "edgegen/a", {}, None, 403,
     "anonymous token lacks permission 'key:read' on \"edgegen/a\""),
    ("GET", "edgegen/a", {}, "made-up-token-0000", 403, "ACL not found"),
    ("GET", "edgegen/a", {}, READER, 200, None),
    ("GET", "edgegen/secret", {}, READER, 403,
     f"token with AccessorID '{READER_ACCESSOR}' lacks permission 'key:read' on {SECRET}"),
    ("GET", "edgegen/nothing", {}, READER, 404, None),      # readable but missing
    ("GET", "private/p", {}, WRITER, 403, "'key:read' on \"private/p\""),
    ("PUT", "edgegen/new", {}, READER, 403, "'key:write' on \"edgegen/new\""),
    ("PUT", "edgegen/new", {}, WRITER, 200, None),
    ("PUT", "edgegen/locked/l", {}, WRITER, 403, "'key:write' on \"edgegen/locked/l\""),
    ("PUT", "private/p", {}, WRITER, 403, "'key:write' on \"private/p\""),
    ("DELETE", "edgegen/new", {}, READER, 403, "'key:write'"),
    ("DELETE", "edgegen/", {"recurse": ""}, WRITER, 403, "'key:write' on \"edgegen/\""),
    ("DELETE", "edgegen/new", {}, WRITER, 200, None),
])
def test_kv_acl_allows_and_denies_as_consul(acl_registry, method, key, params, token, status,
                                           text):
    headers = {"X-Consul-Token": token} if token else {}
    r = httpx.request(method, f"{acl_registry}/v1/kv/{key}", params=params, headers=headers,
                      content=b"x" if method == "PUT" else None)
    assert r.status_code == status, r.text
    if text is not None:
        assert text in r.text
    assert token is None or token not in r.text   # a secret is never in an answer


def test_kv_listings_drop_what_the_token_cannot_read(acl_registry):
    def get(token, **params):
        return httpx.get(f"{acl_registry}/v1/kv/", params=params,
                         headers={"X-Consul-Token": token} if token else {})

    r = get(READER, recurse="")
    assert [e["Key"] for e in r.json()] == ["edgegen/a", "edgegen/locked/l"]
    assert r.headers["X-Consul-Results-Filtered-By-ACLs"] == "true"
    r = get(READER, keys="", separator="/")
    assert r.json() == ["edgegen/"]    # private/ is dropped before the keys are cut
    r = get(MANAGEMENT, keys="", separator="/")
    assert r.json() == ["edgegen/", "private/"] and "X-Consul-Results-Filtered-By-ACLs" not in \
        r.headers
    r = get(None, recurse="")          # nothing readable: Consul's 404, and no filtered header
    assert r.status_code == 404 and "X-Consul-Results-Filtered-By-ACLs" not in r.headers
    assert get(None, keys="").json() == []   # the root answers [] rather than 404


def test_py_consul_gets_its_acl_error_from_the_kv_store(acl_registry):
    port = int(acl_registry.rsplit(":", 1)[1])
    with pytest.raises(consul.ACLPermissionDenied):
        consul.Consul(host="127.0.0.1", port=port, token=READER).kv.put("edgegen/x", "1")
    c = consul.Consul(host="127.0.0.1", port=port, token=WRITER)
    assert c.kv.put("edgegen/rollout/w", "1", cas=0) is True
    assert c.kv.get("edgegen/rollout/w")[1]["Value"] == b"1"
    assert c.kv.delete("edgegen/rollout/", recurse=True) is True
