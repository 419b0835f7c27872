"""Apply, rollout and rollback against a server that answers like the Kubernetes API."""

import pytest

from manifests import deploy as d
from manifests.errors import (
    ApplyConflict, ClusterError, Forbidden, RolloutFailed,
)
from manifests.kube import KubeClient
from manifests.render import BundleRef, DeployConfig
from tests.support.fake_kube import FakeKube, edge_node
from tests.support.procs import free_port

A = BundleRef("smollm2", "a" * 64, "https://bundles.example/a")
B = BundleRef("smollm2", "b" * 64, "https://bundles.example/b")
DS = "/apis/apps/v1/namespaces/edgegen/daemonsets"


@pytest.fixture()
def fake():
    fk = FakeKube([edge_node("eu-1", "eu", "eu-a"), edge_node("us-1", "us", "us-a"),
                   edge_node("gpu-1", "eu", "eu-a", tier="central")]).start()
    yield fk
    fk.stop()


def cfg(bundle=A, **kw):
    return DeployConfig(bundle=bundle, consul_address="http://consul:8500", **kw)


def test_deploy_applies_server_side_and_waits_for_every_node(fake, client):
    seen = []
    decision = d.deploy(client, cfg(), timeout=60, on_progress=seen.append)
    assert decision.state == "complete" and decision.desired == 2
    patches = [r for r in fake.requests if r["method"] == "PATCH"]
    assert patches and all(r["content_type"] == "application/apply-patch+yaml"
                           and r["query"]["fieldManager"] == "edgegen" for r in patches)
    assert "force" not in patches[0]["query"]
    assert {n.node for n in seen[-1].nodes} == {"eu-1", "us-1"}
    assert any(r["query"].get("watch") == "true" for r in fake.requests
               if r["method"] == "GET") or seen[0].state == "complete"
    rows = d.cluster_status(client, "edgegen")
    assert [(r.node, r.bundle, r.ready) for r in rows] == [
        ("eu-1", f"smollm2 {A.digest[:12]} (seed)", True),
        ("us-1", f"smollm2 {A.digest[:12]} (seed)", True)]


def test_the_edge_template_names_no_bundle(fake, client):
    """What lets a new bundle go out without restarting the edge: the DaemonSet's pods read
    their first bundle from the ConfigMap, which a deploy changes only when it completed."""
    d.deploy(client, cfg(A), timeout=60)
    tmpl = fake.obj(DS, "edgegen-edge")["spec"]["template"]
    assert A.digest[:12] not in str(tmpl) and A.url not in str(tmpl)
    cm = fake.obj("/api/v1/namespaces/edgegen/configmaps", "edgegen-bundle")
    assert cm["data"]["bundle.url"] == A.url
    assert cm["data"]["bundle.dir"] == f"smollm2/{A.digest[:12]}"
    assert d.read_deployed(client, "edgegen").config.bundle == A


def test_a_new_bundle_needs_the_fleet_not_a_restart(fake, client):
    d.deploy(client, cfg(A), timeout=60)
    with pytest.raises(ClusterError, match="desired state"):
        d.deploy(client, cfg(B), timeout=60)


def test_crash_looping_first_deploy_names_the_nodes(fake, client):
    fake.bad_digests.add(A.digest)
    with pytest.raises(RolloutFailed, match="crash-looping") as exc:
        d.deploy(client, cfg(A), timeout=60)
    assert sorted(exc.value.failing_nodes) == ["eu-1", "us-1"]


def test_timeout_fails_naming_unready_nodes(fake, client):
    fake.ready_delay = 30
    with pytest.raises(RolloutFailed, match="timed out") as exc:
        d.deploy(client, cfg(A), timeout=2)
    assert sorted(exc.value.failing_nodes) == ["eu-1", "us-1"]


def test_rollback_with_nothing_deployed(client):
    with pytest.raises(ClusterError, match="nothing is deployed"):
        d.rollback(client, "edgegen", timeout=5)


def test_no_matching_nodes(client):
    with pytest.raises(ClusterError, match="no nodes match"):
        d.deploy(client, cfg(node_selector={"disk": "nvme"}), timeout=5)


def test_rbac_forbidden_is_explained(fake, client):
    fake.forbidden.add(("patch", "daemonsets"))
    with pytest.raises(Forbidden, match='RBAC forbids.*cannot patch resource "daemonsets"'):
        d.deploy(client, cfg(), timeout=5)


def test_conflict_with_another_field_manager(fake, client):
    d.deploy(client, cfg(), timeout=60)
    fake.set_owner(DS, "edgegen-edge", ".spec.updateStrategy.rollingUpdate.maxUnavailable",
                   "kubectl-edit")
    with pytest.raises(ApplyConflict, match='conflict with "kubectl-edit".*--force-conflicts'):
        d.deploy(client, cfg(A, max_unavailable="2"), timeout=60)
    d.deploy(client, cfg(A, max_unavailable="2"), timeout=60, force_conflicts=True)
    assert fake.obj(DS, "edgegen-edge")["spec"]["updateStrategy"]["rollingUpdate"][
        "maxUnavailable"] == "2"


def test_missing_object_is_none(client):
    assert client.get("apps/v1", "DaemonSet", "nope", "edgegen") is None


def test_unreachable_api_server(tmp_path):
    fk = FakeKube()
    path = fk.kubeconfig(tmp_path / "kc")
    fk._server.server_close()
    text = (tmp_path / "kc").read_text().replace(fk.url, f"http://127.0.0.1:{free_port()}")
    (tmp_path / "kc").write_text(text)
    c = KubeClient.connect(path, request_timeout=5)
    with pytest.raises(ClusterError, match="cannot reach the Kubernetes API server"):
        c.list("v1", "Node")


def test_no_kubeconfig(tmp_path, monkeypatch):
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing"))
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(ClusterError, match="no kubeconfig found"):
        KubeClient.connect()
    with pytest.raises(ClusterError, match="no kubeconfig at"):
        KubeClient.connect(str(tmp_path / "nope.yaml"))
