"""`edgegen deploy --target k3s` after the first deploy: the bundle goes out through the
nodes' desired state in a real `edgegen registry`, reached through the fake Kubernetes API
server's service proxy as a deploy reaches the cluster's Consul; the agents' figures come
through its pod proxy. Nothing restarts: pods keep their uid and the DaemonSet its generation.
"""

from __future__ import annotations

import threading
import time

import pytest

from manifests import deploy as d
from manifests.errors import DeployError, RolloutFailed
from manifests.fleet_rollout import RolloutOptions
from manifests.render import BundleRef, DeployConfig
from tests.cloud_router.registry_support import start_registry
from tests.support.fake_kube import FakeKube, edge_node
from tests.support.fake_nodes import FakeNode, status

A = BundleRef("smollm2", "a" * 64, "https://bundles.example/a")
B = BundleRef("smollm2", "b" * 64, "https://bundles.example/b")
C = BundleRef("smollm2-fp32", "c" * 64, "https://bundles.example/c")
DS = "/apis/apps/v1/namespaces/edgegen/daemonsets"
PODS = "/api/v1/namespaces/edgegen/pods"
CM = "/api/v1/namespaces/edgegen/configmaps"
NODES = {"eu-1": "eu", "eu-2": "eu", "us-1": "us"}
FAST = RolloutOptions(waves="1,100%", bake_s=1.0, min_requests=1, poll_s=0.1)


@pytest.fixture()
def registry(tmp_path):
    proc, url = start_registry(tmp_path)
    yield url
    proc.stop()


@pytest.fixture()
def fake(registry):
    fk = FakeKube([*(edge_node(n, r, f"{r}-a") for n, r in NODES.items()),
                   edge_node("gpu-1", "eu", "eu-a", tier="central")]).start()
    fk.proxies[("services", "consul", "consul-server", 8500)] = registry
    yield fk
    fk.stop()


@pytest.fixture()
def fleet(fake, client, registry):
    """The first deploy (bundle A), and an agent per edge node serving it."""
    d.deploy(client, DeployConfig(bundle=A), timeout=60)
    slow: set[str] = set()
    unfetchable: set[str] = set()
    nodes = {n: FakeNode(registry, n, r, A.digest, slow, unfetchable).start()
             for n, r in NODES.items()}
    for n, node in nodes.items():
        fake.proxies[("pods", "edgegen", f"edgegen-edge-{n}", 8000)] = node.url
    yield nodes, slow, unfetchable
    for node in nodes.values():
        node.stop()


def pods(fake) -> dict[str, str]:
    return {n: fake.obj(PODS, f"edgegen-edge-{n}")["metadata"]["uid"] for n in NODES}


def access(client, options=FAST, **kw) -> d.Fleet:
    return d.fleet_access(client, DeployConfig(bundle=A), options, **kw)


def test_a_new_bundle_goes_out_in_waves_and_restarts_nothing_and_rolls_back(fake, client, fleet,
                                                                         registry):
    nodes, _, _ = fleet
    uids, generation = pods(fake), fake.obj(DS, "edgegen-edge")["metadata"]["generation"]
    views = []
    view = d.deploy(client, DeployConfig(bundle=B), timeout=60, on_progress=views.append,
                    fleet=access(client))
    assert view.state == "complete"
    assert [w["name"] for w in view.waves] == ["canary", "all"]
    assert all(w["state"] == "promoted" and "pass" in w["gates"] for w in view.waves)
    assert {n: node.serving for n, node in nodes.items()} == dict.fromkeys(NODES, B.digest)
    assert all(status(registry, n)["last_good"] == A.digest for n in NODES)
    # K3s restarted nothing, and only the completed rollout moved the record
    assert pods(fake) == uids
    assert fake.obj(DS, "edgegen-edge")["metadata"]["generation"] == generation
    state = d.read_deployed(client, "edgegen")
    assert state.config.bundle == B and state.history == [A]
    assert fake.obj(CM, "edgegen-bundle")["data"]["bundle.url"] == B.url
    # Consul and the agents' /metrics were reached through the API server's proxies
    proxied = [r["path"] for r in fake.requests if "/proxy/" in r["path"]]
    assert any("/services/consul-server:8500/proxy/v1/kv/edgegen/" in p for p in proxied)
    assert any("/pods/edgegen-edge-" in p and p.endswith("/proxy/metrics") for p in proxied)
    rows = d.cluster_status(client, "edgegen", access(client).kv)
    assert {r.node: r.bundle for r in rows if r.tier == "edge"} == \
        dict.fromkeys(NODES, f"smollm2 {B.digest[:12]}")

    # `edgegen rollback`: a rollout back to A, which every node still has on disk
    target, view = d.rollback(client, "edgegen", timeout=60, fleet=access(client))
    assert target == A and view.state == "complete"
    assert {n: node.serving for n, node in nodes.items()} == dict.fromkeys(NODES, A.digest)
    state = d.read_deployed(client, "edgegen")
    assert state.config.bundle == A and state.history == [B]
    assert pods(fake) == uids


def test_a_canary_failing_its_gate_rolls_back_from_cache(fake, client, fleet, registry):
    nodes, slow, _ = fleet
    slow.add(C.digest)      # TTFT 2 s instead of 50 ms: fails ttft_p95<=2x
    uids = pods(fake)
    with pytest.raises(RolloutFailed, match=r"wave canary failed its gates.*ttft_p95") as exc:
        d.deploy(client, DeployConfig(bundle=C), timeout=60, fleet=access(client))
    assert "went back to their last good bundle" in str(exc.value)
    canary = [n for n, node in nodes.items() if node.switches]
    assert len(canary) == 1 and nodes[canary[0]].switches == [C.digest, A.digest]
    assert {n: node.serving for n, node in nodes.items()} == dict.fromkeys(NODES, A.digest)
    assert pods(fake) == uids
    assert d.read_deployed(client, "edgegen").config.bundle == A


def test_a_bundle_a_node_cannot_fetch_fails_before_anything_switched(client, fleet):
    nodes, _, unfetchable = fleet
    unfetchable.add(B.digest)
    with pytest.raises(RolloutFailed, match="cannot pre-pull the bundle.*failed verification"):
        d.deploy(client, DeployConfig(bundle=B), timeout=60, fleet=access(client))
    assert not any(node.switches for node in nodes.values())
    assert d.read_deployed(client, "edgegen").config.bundle == A


def test_an_unreachable_consul_pauses_the_rollout_until_it_answers(fake, client, fleet, registry):
    """The API server answers 503 while Consul has no endpoint: the rollout keeps asking
    instead of failing, and completes once Consul is back."""
    nodes, _, _ = fleet
    options = RolloutOptions(waves="1,100%", bake_s=2.5, min_requests=1, poll_s=0.1)
    result: dict = {}

    def run():
        try:
            result["view"] = d.deploy(client, DeployConfig(bundle=B), timeout=60,
                                      fleet=access(client, options))
        except Exception as exc:   # noqa: BLE001 - reported below
            result["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    deadline = time.monotonic() + 30
    while not any(node.switches for node in nodes.values()) and time.monotonic() < deadline:
        time.sleep(0.05)
    key = ("services", "consul", "consul-server", 8500)
    asked = len(fake.requests)
    fake.proxies.pop(key)                       # the canary bakes; Consul goes away
    time.sleep(1.5)
    away = [r for r in fake.requests[asked:] if "/consul-server:8500/proxy/" in r["path"]]
    waiting = thread.is_alive()
    fake.proxies[key] = registry
    thread.join(60)
    assert away and waiting      # it kept asking (and got 503s) instead of failing
    assert "error" not in result, result.get("error")
    assert result["view"].state == "complete"
    assert {n: node.serving for n, node in nodes.items()} == dict.fromkeys(NODES, B.digest)


def test_rbac_without_the_proxy_subresource_is_explained(fake, client, fleet):
    fake.forbidden.add(("get", "services/proxy"))
    with pytest.raises(DeployError, match=r"Kubernetes API server refused the request to "
                       r'Consul \(403\).*cannot get resource "services/proxy"'):
        d.deploy(client, DeployConfig(bundle=B), timeout=60, fleet=access(client))
    assert d.read_deployed(client, "edgegen").config.bundle == A
