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
    cm = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "edgegen-bundle")
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
