"""`edgegen deploy --dry-run`, `edgegen manifests render`, and the errors users hit."""

import yaml
from typer.testing import CliRunner

from cli.main import app
from tests.support.fake_kube import FakeKube, edge_node

runner = CliRunner()


def test_help_of_every_command():
    for cmd in (["deploy"], ["rollback"], ["status"], ["manifests", "render"], ["up"]):
        r = runner.invoke(app, [*cmd, "--help"])
        assert r.exit_code == 0, r.output


def test_dry_run_prints_the_yaml(fake_bundle):
    r = runner.invoke(app, ["deploy", str(fake_bundle.path), "--dry-run", "--bundle-url",
                            "https://b.example/x/", "--max-unavailable", "2"])
    assert r.exit_code == 0, r.output
    docs = list(yaml.safe_load_all(r.output))
    ds = next(d for d in docs if d["kind"] == "DaemonSet" and d["metadata"]["name"] == "edgegen-edge")
    assert ds["spec"]["updateStrategy"]["rollingUpdate"]["maxUnavailable"] == "2"
    cm = next(d for d in docs
              if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "edgegen-bundle")
    assert cm["data"]["bundle.digest"] == fake_bundle.digest


def test_render_writes_a_folder(fake_bundle, tmp_path):
    r = runner.invoke(app, ["manifests", "render", str(fake_bundle.path), "--out",
                            str(tmp_path / "out"), "--bundle-url", "https://b.example/x/"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "out" / "kustomization.yaml").exists()


def test_the_broker_is_locked_unless_anonymous_devices_are_opted_in(fake_bundle):
    def mosquitto_conf(*extra) -> str:
        r = runner.invoke(app, ["deploy", str(fake_bundle.path), "--dry-run", "--bundle-url",
                                "https://b.example/x/", *extra])
        assert r.exit_code == 0, r.output
        docs = list(yaml.safe_load_all(r.output))
        cm = next(d for d in docs if d["kind"] == "ConfigMap" and "mosquitto.conf" in
                  d.get("data", {}))
        return cm["data"]["mosquitto.conf"]

    assert "allow_anonymous false" in mosquitto_conf()
    assert "allow_anonymous true" in mosquitto_conf("--mqtt-anonymous")


def test_k3s_needs_a_url_the_cluster_can_reach(fake_bundle):
    r = runner.invoke(app, ["deploy", str(fake_bundle.path), "--dry-run"])
    assert r.exit_code != 0
    assert "not reachable from the cluster" in str(r.exception)


def test_deploy_against_the_fake_api(fake_bundle, tmp_path):
    fk = FakeKube([edge_node("eu-1", "eu", "eu-a")]).start()
    try:
        kc = fk.kubeconfig(tmp_path / "kc")
        r = runner.invoke(app, ["deploy", str(fake_bundle.path), "--kubeconfig", kc,
                                "--bundle-url", "https://b.example/x/", "--timeout", "60"])
        assert r.exit_code == 0, r.output
        assert "rolled out" in r.output
        r = runner.invoke(app, ["status", "--kubeconfig", kc], env={"COLUMNS": "200"})
        assert r.exit_code == 0 and "eu-1" in r.output and fake_bundle.digest12 in r.output
    finally:
        fk.stop()


def test_a_second_deploy_rolls_out_through_consul_and_rollback_goes_back(fake_bundle, tmp_path):
    """The K3s path after the first deploy, from the command line: the new bundle goes out in
    waves through the cluster's Consul (a real registry behind the fake API server's service
    proxy), `status` shows what each node's agent reports, and `rollback` goes back."""
    from edge_agent.bundle import staging_dir, write_bundle
    from tests.cloud_router.registry_support import start_registry
    from tests.support.fake_nodes import FakeNode

    stage = staging_dir(fake_bundle.path.parent.parent)
    (stage / "model.onnx").write_bytes(b"another model")
    second = write_bundle(stage, {**fake_bundle.manifest, "precision": "int4"},
                          fake_bundle.path.parent.parent)
    registry, consul = start_registry(tmp_path)
    fk = FakeKube([edge_node("eu-1", "eu", "eu-a"), edge_node("us-1", "us", "us-a")]).start()
    fk.proxies[("services", "consul", "consul-server", 8500)] = consul
    nodes = []
    try:
        kc = fk.kubeconfig(tmp_path / "kc")
        common = ["--kubeconfig", kc, "--timeout", "60"]
        r = runner.invoke(app, ["deploy", str(fake_bundle.path), "--bundle-url",
                                "https://b.example/x/", *common])
        assert r.exit_code == 0, r.output
        for name, region in (("eu-1", "eu"), ("us-1", "us")):
            nodes.append(FakeNode(consul, name, region, fake_bundle.digest).start())
            fk.proxies[("pods", "edgegen", f"edgegen-edge-{name}", 8000)] = nodes[-1].url
        rollout = ["--waves", "1,100%", "--bake", "1", "--inconclusive", "fail"]
        r = runner.invoke(app, ["deploy", str(second.path), "--bundle-url",
                                "https://b.example/y/", *common, *rollout],
                          env={"COLUMNS": "200"})
        assert r.exit_code == 0, r.output
        assert [n.serving for n in nodes] == [second.digest] * 2
        r = runner.invoke(app, ["status", "--kubeconfig", kc], env={"COLUMNS": "200"})
        assert r.exit_code == 0 and r.output.count(second.digest12) == 2, r.output
        r = runner.invoke(app, ["rollback", *common, "--bake", "1"], env={"COLUMNS": "200"})
        assert r.exit_code == 0, r.output
        assert f"rolled back to tiny-test {fake_bundle.digest12}" in r.output
        assert [n.serving for n in nodes] == [fake_bundle.digest] * 2
    finally:
        for n in nodes:
            n.stop()
        fk.stop()
        registry.stop()
