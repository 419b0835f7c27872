"""Consul's ACLs over a real `edgegen registry --acl-file` process: the impostor's writes are
refused with Consul's status and text, reads are filtered as Consul filters them, py-consul
gets its ACLPermissionDenied, the router's reader says what Consul said, and no token reaches
a log line."""

from __future__ import annotations

import asyncio
import json

import consul
import httpx
import pytest

from cloud_router.discovery import read_health
from cloud_router.errors import RegistryError
from tests.cloud_router.registry_support import ReadyServer, start_registry

MANAGEMENT = "11111111-2222-4333-8444-555555555555"
AGENT = "aaaaaaaa-bbbb-4ccc-8ddd-eeeeeeeeeeee"        # write on edgegen-edge
CENTRAL = "cccccccc-bbbb-4ccc-8ddd-eeeeeeeeeeee"      # write on edgegen-central only
READER = "rrrrrrrr-bbbb-4ccc-8ddd-eeeeeeeeeeee"       # what the router gets
NO_NODES = "nnnnnnnn-bbbb-4ccc-8ddd-eeeeeeeeeeee"     # service read, no node read
SECRETS = (MANAGEMENT, AGENT, CENTRAL, READER, NO_NODES)
ACCESSOR = {"agent": "0a0a0a0a-0000-4000-8000-000000000001",
            "central": "0a0a0a0a-0000-4000-8000-000000000002",
            "reader": "0a0a0a0a-0000-4000-8000-000000000003"}
ACL = {
    "default_policy": "deny",
    "tokens": [
        {"secret_id": MANAGEMENT, "management": True, "description": "management"},
        {"secret_id": AGENT, "accessor_id": ACCESSOR["agent"],
         "rules": {"service": {"edgegen-edge": {"policy": "write"}}}},
        {"secret_id": CENTRAL, "accessor_id": ACCESSOR["central"],
         "rules": {"service": {"edgegen-central": {"policy": "write"}}}},
        {"secret_id": READER, "accessor_id": ACCESSOR["reader"],
         "rules": {"service_prefix": {"edgegen-": {"policy": "read"}},
                   "node_prefix": {"": {"policy": "read"}}}},
        {"secret_id": NO_NODES, "rules": {"service_prefix": {"": {"policy": "read"}}}},
    ],
}
ANONYMOUS_SENTENCE = ("The anonymous token is used implicitly when a request does not specify "
                      "a token.")


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("registry-acl")
    acl_file = tmp / "acl.json"
    acl_file.write_text(json.dumps(ACL))
    acl_file.chmod(0o600)
    # --debug: uvicorn's access log is on, so a ?token= in a URL would reach the log
    proc, url = start_registry(tmp, acl_file=acl_file, debug=True)
    yield proc, url
    proc.stop()


@pytest.fixture
def ready():
    server = ReadyServer()
    yield server
    server.close()


def edge(node: str, port: int, service: str = "edgegen-edge", **meta) -> dict:
    return {"Name": service, "ID": f"{service}-{node}-{port}", "Address": "127.0.0.1",
            "Port": port, "Meta": {"node": node, "region": "eu-west", **meta},
            "Check": {"TTL": "10m", "Status": "passing"}}


def put(url: str, path: str, body: dict | None = None, token: str | None = None,
        **kw) -> httpx.Response:
    headers = {"X-Consul-Token": token} if token else {}
    return httpx.put(url + path, json=body, headers=headers, **kw)


def test_an_impostor_without_a_token_cannot_register(registry):
    _, url = registry
    r = put(url, "/v1/agent/service/register", edge("impostor", 9999))
    assert r.status_code == 403
    assert r.text == ("Permission denied: anonymous token lacks permission 'service:write' on "
                      f"\"edgegen-edge\". {ANONYMOUS_SENTENCE}")
    r = put(url, "/v1/agent/service/register", edge("impostor", 9999), token="made-up-token")
    assert (r.status_code, r.text) == (403, "ACL not found")
    listed = httpx.get(url + "/v1/agent/services", headers={"X-Consul-Token": MANAGEMENT})
    assert not any("impostor" in sid for sid in listed.json())


def test_a_read_only_token_cannot_register(registry):
    _, url = registry
    r = put(url, "/v1/agent/service/register", edge("impostor", 9998), token=READER)
    assert r.status_code == 403
    assert r.text == (f"Permission denied: token with AccessorID '{ACCESSOR['reader']}' lacks "
                      "permission 'service:write' on \"edgegen-edge\"")
    assert READER not in r.text


@pytest.mark.parametrize("how", ["header", "bearer", "query"])
def test_a_write_token_registers_however_consul_accepts_it(registry, how):
    _, url = registry
    body = edge(f"n-{how}", 8100)
    if how == "header":
        r = put(url, "/v1/agent/service/register", body, token=AGENT)
    elif how == "bearer":
        r = httpx.put(url + "/v1/agent/service/register", json=body,
                      headers={"Authorization": f"Bearer {AGENT}"})
    else:
        r = httpx.put(url + "/v1/agent/service/register", json=body, params={"token": AGENT})
    assert r.status_code == 200, r.text
    # ... but only for the service its rules name
    r = put(url, "/v1/agent/service/register", edge(f"n-{how}", 8100, "edgegen-central"),
            token=AGENT)
    assert r.status_code == 403 and "'service:write' on \"edgegen-central\"" in r.text


def test_one_agents_token_cannot_deregister_or_touch_another_service(registry):
    _, url = registry
    victim = edge("victim", 8200)
    assert put(url, "/v1/agent/service/register", victim, token=AGENT).status_code == 200
    sid = victim["ID"]
    for token, who in ((None, "anonymous token"),
                       (READER, f"token with AccessorID '{ACCESSOR['reader']}'"),
                       (CENTRAL, f"token with AccessorID '{ACCESSOR['central']}'")):
        r = put(url, f"/v1/agent/service/deregister/{sid}", token=token)
        assert r.status_code == 403, (who, r.text)
        assert r.text.startswith(f"Permission denied: {who} lacks permission 'service:write' "
                                 "on \"edgegen-edge\"")
        r = put(url, f"/v1/agent/check/fail/service:{sid}", token=token)
        assert r.status_code == 403 and "service:write" in r.text
        # overwriting the service (same ID) from another service name is refused too
        r = put(url, "/v1/agent/service/register",
                {**edge("victim", 8200, "edgegen-central"), "ID": sid}, token=token)
        assert r.status_code == 403
    entries = httpx.get(url + "/v1/health/service/edgegen-edge",
                        headers={"X-Consul-Token": READER}).json()
    (entry,) = [e for e in entries if e["Service"]["ID"] == sid]
    assert entry["Checks"][0]["Status"] == "passing" and entry["Service"]["Port"] == 8200
    # the owner's token may
    assert put(url, f"/v1/agent/check/warn/service:{sid}", token=AGENT).status_code == 200
    assert put(url, f"/v1/agent/service/deregister/{sid}", token=AGENT).status_code == 200


def test_reads_are_filtered_as_consul_filters_them(registry):
    _, url = registry
    assert put(url, "/v1/agent/service/register", edge("visible", 8300),
               token=AGENT).status_code == 200
    path = "/v1/health/service/edgegen-edge"

    def read(token=None):
        return httpx.get(url + path, headers={"X-Consul-Token": token} if token else {})

    full = read(READER)
    assert "visible" in {e["Node"]["Node"] for e in full.json()}
    assert "X-Consul-Results-Filtered-By-ACLs" not in full.headers
    # a token that may read services but not their nodes: nothing, and told so
    partial = read(NO_NODES)
    assert partial.status_code == 200 and partial.json() == []
    assert partial.headers["X-Consul-Results-Filtered-By-ACLs"] == "true"
    # the anonymous token: nothing, and not told (Consul tells only authenticated callers)
    anonymous = read()
    assert anonymous.status_code == 200 and anonymous.json() == []
    assert "X-Consul-Results-Filtered-By-ACLs" not in anonymous.headers
    assert int(anonymous.headers["X-Consul-Index"]) >= 1
    assert read("made-up-token").status_code == 403
    # the same for the catalog, the agent's own lists, checks and coordinates
    services = httpx.get(url + "/v1/catalog/services", headers={"X-Consul-Token": NO_NODES})
    assert "edgegen-edge" in services.json()
    assert httpx.get(url + "/v1/catalog/services").json() == {}
    assert httpx.get(url + "/v1/catalog/service/edgegen-edge",
                     headers={"X-Consul-Token": NO_NODES}).json() == []
    assert httpx.get(url + "/v1/agent/services").json() == {}
    mine = httpx.get(url + "/v1/agent/services", headers={"X-Consul-Token": AGENT}).json()
    assert "edgegen-edge-visible-8300" in mine
    assert httpx.get(url + "/v1/agent/checks").json() == {}
    assert httpx.get(url + "/v1/coordinate/nodes").json() == []
    r = httpx.get(url + "/v1/agent/service/edgegen-edge-visible-8300")
    assert r.status_code == 403 and "'service:read' on \"edgegen-edge\"" in r.text
    # /v1/status/* needs no token
    assert httpx.get(url + "/v1/status/leader").status_code == 200
    assert httpx.get(url + "/v1/status/peers").status_code == 200


def test_py_consul_gets_consuls_403_as_acl_permission_denied(registry, ready):
    _, url = registry
    port = int(url.rsplit(":", 1)[1])
    payload = dict(service_id="edgegen-edge-pyconsul-8400", address="127.0.0.1",
                   port=ready.port, meta={"node": "pyconsul"},
                   check=consul.Check.http(ready.url, "1s", timeout="1s", deregister="1m"))
    agent = consul.Consul(host="127.0.0.1", port=port, token=AGENT)
    agent.token = AGENT   # py-consul prefers $CONSUL_HTTP_TOKEN; the test's env has none
    assert agent.agent.service.register("edgegen-edge", **payload) is True
    assert "edgegen-edge-pyconsul-8400" in agent.agent.services(
        filter_expr='ID == "edgegen-edge-pyconsul-8400"')
    reader = consul.Consul(host="127.0.0.1", port=port, token=READER)
    reader.token = READER
    with pytest.raises(consul.ACLPermissionDenied) as e:
        reader.agent.service.register("edgegen-edge", **payload)
    assert str(e.value) == (f"Permission denied: token with AccessorID '{ACCESSOR['reader']}' "
                            "lacks permission 'service:write' on \"edgegen-edge\"")
    anonymous = consul.Consul(host="127.0.0.1", port=port)
    anonymous.token = None
    with pytest.raises(consul.ACLPermissionDenied, match="anonymous token lacks permission"):
        anonymous.agent.service.deregister("edgegen-edge-pyconsul-8400")
    unknown = consul.Consul(host="127.0.0.1", port=port, token="made-up-token")
    unknown.token = "made-up-token"
    with pytest.raises(consul.ACLPermissionDenied, match="^ACL not found$"):
        unknown.agent.services()
    _, entries = consul.Consul(host="127.0.0.1", port=port, token=READER).health.service(
        "edgegen-edge", token=READER)
    assert "pyconsul" in {e["Node"]["Node"] for e in entries}
    assert agent.agent.service.deregister("edgegen-edge-pyconsul-8400") is True


def test_the_routers_reader_reports_consuls_refusal_clearly(registry):
    _, url = registry

    async def read(token):
        async with httpx.AsyncClient() as client:
            return await read_health(client, url, "edgegen-edge", token=token)

    with pytest.raises(RegistryError) as e:
        asyncio.run(read("made-up-token"))
    text = str(e.value)
    assert "HTTP 403" in text and "ACL not found" in text and "made-up-token" not in text
    assert "--consul-token-file" in text
    assert asyncio.run(read(READER))[1] is not None


def test_no_token_reaches_the_registrys_log(registry):
    proc, url = registry
    for secret in SECRETS:   # every way a token can arrive, on reads and writes
        httpx.get(url + "/v1/health/service/edgegen-edge", params={"token": secret})
        httpx.get(url + "/v1/catalog/services", headers={"Authorization": f"Bearer {secret}"})
        put(url, "/v1/agent/service/deregister/nope", params={"token": secret})
    log = proc.log()
    assert "GET /v1/health/service/edgegen-edge?token=<hidden>" in log   # the access log ran
    assert '"acl: permission denied"' in log   # denials are logged, by accessor only
    for secret in SECRETS:
        assert secret not in log
