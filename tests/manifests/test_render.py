"""Every rendered manifest validates: built-in kinds with kubernetes-validate (strict) for the
Kubernetes version of the targeted K3s release, Traefik and K3s CRDs against their schemas."""

from pathlib import Path

import jsonschema
import kubernetes_validate.utils as kv
import pytest
import yaml

from manifests.errors import RenderError
from manifests.render import (
    K3S_KUBERNETES_VERSION, BundleRef, DeployConfig, find, parse_selector, render, to_yaml,
    write_manifests,
)

CRDS = Path(__file__).parent / "data" / "crds"
BUNDLE = BundleRef("smollm2-135m-int8", "ab" * 32, "https://bundles.example/smollm2/ab.tar")


def _strict(schema):
    """Reject unknown fields, as the API server prunes/rejects them for structural schemas."""
    if isinstance(schema, dict):
        if schema.get("type") == "object" and "properties" in schema \
                and "additionalProperties" not in schema \
                and not schema.get("x-kubernetes-preserve-unknown-fields"):
            schema = {**schema, "additionalProperties": False}
        return {k: _strict(v) for k, v in schema.items()}
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


def _crd_schemas():
    out = {}
    for f in CRDS.glob("*.yaml"):
        crd = yaml.safe_load(f.read_text())
        for v in crd["spec"]["versions"]:
            key = (f"{crd['spec']['group']}/{v['name']}", crd["spec"]["names"]["kind"])
            out[key] = _strict(v["schema"]["openAPIV3Schema"])
    return out


SCHEMAS = _crd_schemas()


def validate(doc, version=K3S_KUBERNETES_VERSION):
    key = (doc["apiVersion"], doc["kind"])
    if key in SCHEMAS:
        jsonschema.validate(doc, SCHEMAS[key])
    else:
        kv.validate(doc, version, strict=True)


FLAGS = [
    {},
    {"consul_address": "http://consul.consul.svc:8500"},
    {"central": False, "mqtt": False, "max_unavailable": "25%"},
    {"node_selector": {"topology.kubernetes.io/region": "eu-west", "disk": "ssd"},
     "router_host": "llm.example.com", "tls_secret": "llm-tls", "entry_points": ("websecure",),
     "namespace": "edge-prod", "image": "registry.local/edgegen:dev", "central_replicas": 2,
     "mqtt_anonymous": True},
]


@pytest.mark.parametrize("flags", FLAGS, ids=["defaults", "consul", "minimal", "full"])
@pytest.mark.parametrize("version", [K3S_KUBERNETES_VERSION, "1.37.0"])
def test_every_rendered_manifest_validates(flags, version):
    docs = render(DeployConfig(bundle=BUNDLE, **flags))
    kinds = {d["kind"] for d in docs}
    assert {"Namespace", "ConfigMap", "DaemonSet", "Deployment", "Service",
            "IngressRoute", "Middleware"} <= kinds
    for doc in docs:
        validate(doc, version)
    assert ("HelmChart" in kinds) == ("consul_address" not in flags)


def test_the_validators_do_reject_bad_manifests():
    docs = render(DeployConfig(bundle=BUNDLE))
    ds = find(docs, "DaemonSet", "edgegen-edge")
    ds["spec"]["template"]["spec"]["containers"][0]["livenessProbes"] = {}
    with pytest.raises(Exception, match="livenessProbes"):
        validate(ds)
    route = find(docs, "IngressRoute", "edgegen-router")
    route["spec"]["routes"][0]["servics"] = []
    with pytest.raises(jsonschema.ValidationError):
        validate(route)


def test_edge_daemonset_carries_the_contract():
    docs = render(DeployConfig(bundle=BUNDLE, max_unavailable="2"))
    ds = find(docs, "DaemonSet", "edgegen-edge")
    tmpl = ds["spec"]["template"]
    assert ds["spec"]["updateStrategy"]["rollingUpdate"]["maxUnavailable"] == "2"
    assert tmpl["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
    assert tmpl["spec"]["nodeSelector"] == {"edgegen.io/tier": "edge"}
    # the first bundle comes from the ConfigMap, resolved when a container starts
    init = tmpl["spec"]["initContainers"][0]
    assert init["args"][:3] == ["bundle", "pull", "$(EDGEGEN_BUNDLE_URL)"]
    agent = tmpl["spec"]["containers"][0]
    for container in (init, agent):
        refs = {e["name"]: e["valueFrom"]["configMapKeyRef"] for e in container["env"]
                if "configMapKeyRef" in e.get("valueFrom", {})}
        assert refs == {"EDGEGEN_BUNDLE_URL": {"name": "edgegen-bundle", "key": "bundle.url"},
                        "EDGEGEN_BUNDLE_DIR": {"name": "edgegen-bundle", "key": "bundle.dir"}}
    cm = find(docs, "ConfigMap", "edgegen-bundle")["data"]
    assert cm["bundle.url"] == BUNDLE.url
    assert cm["bundle.dir"] == f"{BUNDLE.name}/{BUNDLE.digest[:12]}"
    assert agent["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert agent["livenessProbe"]["httpGet"]["path"] == "/healthz"
    env = {e["name"]: e for e in agent["env"]}
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    assert "topology.kubernetes.io/region" in env["EDGEGEN_REGION"]["valueFrom"]["fieldRef"]["fieldPath"]
    assert tmpl["spec"]["volumes"][0]["hostPath"]["path"] == "/var/lib/edgegen/bundles"
    assert "$(EDGEGEN_STORE)/$(EDGEGEN_BUNDLE_DIR)" in agent["args"]
    assert "--follow" in agent["args"]
    for key in ("name", "instance", "component", "part-of", "version", "managed-by"):
        assert f"app.kubernetes.io/{key}" in ds["metadata"]["labels"]


def test_central_tier_asks_for_a_gpu():
    dep = find(render(DeployConfig(bundle=BUNDLE)), "Deployment", "edgegen-central")
    spec = dep["spec"]["template"]["spec"]
    assert spec["runtimeClassName"] == "nvidia"
    assert spec["nodeSelector"] == {"edgegen.io/tier": "central"}
    agent = spec["containers"][0]
    assert agent["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert agent["args"][agent["args"].index("--device") + 1] == "cuda"
    assert agent["args"][agent["args"].index("--tier") + 1] == "central"


def test_a_new_bundle_leaves_the_edge_pod_template_alone_and_keeps_history():
    """K3s restarts nothing on a rollout: only the ConfigMap (and the central tier's
    Deployment, a surge rolling update) name the bundle."""
    a = render(DeployConfig(bundle=BUNDLE))
    other = BundleRef("smollm2-135m-int8", "cd" * 32, "https://bundles.example/cd.tar")
    b = render(DeployConfig(bundle=other), history=[BUNDLE])
    ta = find(a, "DaemonSet", "edgegen-edge")
    tb = find(b, "DaemonSet", "edgegen-edge")
    assert ta == tb
    assert find(a, "Deployment", "edgegen-central") != find(b, "Deployment", "edgegen-central")
    cm = find(b, "ConfigMap", "edgegen-bundle")
    assert cm["data"]["bundle.digest"] == other.digest
    assert BUNDLE.digest in cm["metadata"]["annotations"]["edgegen.io/history"]


@pytest.mark.parametrize("bad, match", [
    ({"namespace": "Bad_NS"}, "--namespace"),
    ({"max_unavailable": "0"}, "--max-unavailable"),
    ({"max_unavailable": "150%"}, "--max-unavailable"),
    ({"consul_address": "consul:8500"}, "--consul-address"),
])
def test_bad_flags_are_refused_by_name(bad, match):
    with pytest.raises(RenderError, match=match):
        render(DeployConfig(bundle=BUNDLE, **bad))


def test_selector_parsing():
    assert parse_selector("a=b, topology.kubernetes.io/region=eu") == {
        "a": "b", "topology.kubernetes.io/region": "eu"}
    assert parse_selector(None) == {}
    for bad in ("a!=b", "a in (b)", "=b", "a=b c"):
        with pytest.raises(RenderError):
            parse_selector(bad)


def test_values_cannot_break_the_yaml():
    with pytest.raises(RenderError, match="DNS name"):
        render(DeployConfig(bundle=BUNDLE, router_host="x`) || Host(`evil"))
    docs = render(DeployConfig(bundle=BUNDLE, image="img: {a}"))
    assert find(docs, "Deployment", "edgegen-router")["spec"]["template"]["spec"][
        "containers"][0]["image"] == "img: {a}"


def test_write_manifests_is_a_kustomize_base(tmp_path):
    docs = render(DeployConfig(bundle=BUNDLE))
    paths = write_manifests(docs, tmp_path)
    k = yaml.safe_load((tmp_path / "kustomization.yaml").read_text())
    assert len(k["resources"]) == len(docs) == len(paths) - 1
    for name in k["resources"]:
        assert yaml.safe_load((tmp_path / name).read_text())["kind"]
    assert len(list(yaml.safe_load_all(to_yaml(docs)))) == len(docs)


def test_the_broker_is_locked_by_a_secret_and_the_acl():
    from edge_agent.mqtt.contract import AGENT_USER, broker_acl
    from manifests.render import MQTT_SECRET

    docs = render(DeployConfig(bundle=BUNDLE))
    cm = find(docs, "ConfigMap", "edgegen-mosquitto")
    conf = cm["data"]["mosquitto.conf"].splitlines()
    assert "allow_anonymous false" in conf
    assert "password_file /mosquitto/secret/passwd" in conf
    assert "acl_file /mosquitto/config/acl" in conf
    assert cm["data"]["acl"] == broker_acl()
    pod = find(docs, "DaemonSet", "edgegen-mosquitto")["spec"]["template"]["spec"]
    [volume] = [v for v in pod["volumes"] if "secret" in v]
    assert volume["secret"] == {"secretName": MQTT_SECRET, "defaultMode": 0o440,
                                "items": [{"key": "passwd", "path": "passwd"}]}
    mounts = {m["name"]: m for m in pod["containers"][0]["volumeMounts"]}
    assert mounts[volume["name"]] == {"name": volume["name"], "mountPath": "/mosquitto/secret",
                                      "readOnly": True}
    # The agent: its user in args, its password from the Secret into the environment only.
    agent = find(docs, "DaemonSet", "edgegen-edge")["spec"]["template"]["spec"]["containers"][0]
    args = agent["args"]
    assert args[args.index("--mqtt-username") + 1] == AGENT_USER
    assert not any("password" in a.lower() for a in args)
    env = {e["name"]: e for e in agent["env"]}
    assert env["EDGEGEN_MQTT_PASSWORD"]["valueFrom"] == {
        "secretKeyRef": {"name": MQTT_SECRET, "key": "agent-password"}}
    central = find(docs, "Deployment", "edgegen-central")["spec"]["template"]["spec"]
    assert "EDGEGEN_MQTT_PASSWORD" not in {e["name"] for e in central["containers"][0]["env"]}
    # Anonymous devices: an explicit opt-in; the ACL stays.
    open_cm = find(render(DeployConfig(bundle=BUNDLE, mqtt_anonymous=True)), "ConfigMap",
                   "edgegen-mosquitto")
    assert "allow_anonymous true" in open_cm["data"]["mosquitto.conf"].splitlines()
    assert "acl_file /mosquitto/config/acl" in open_cm["data"]["mosquitto.conf"]
    no_mqtt = render(DeployConfig(bundle=BUNDLE, mqtt=False))
    edge = find(no_mqtt, "DaemonSet", "edgegen-edge")["spec"]["template"]["spec"]["containers"][0]
    assert "--mqtt-username" not in edge["args"]
    assert "EDGEGEN_MQTT_PASSWORD" not in {e["name"] for e in edge["env"]}


def test_local_processes_get_the_secret_from_the_environment_never_argv():
    from manifests.local import Node, node_processes

    docs = render(DeployConfig(bundle=BUNDLE))
    node = Node("edge-1", region="eu")
    with pytest.raises(RenderError, match="Secret edgegen-mqtt"):
        node_processes(docs, node, 8001, {"EDGEGEN_MQTT": "mqtt://127.0.0.1:1883"})
    overrides = {"EDGEGEN_MQTT": "mqtt://127.0.0.1:1883", "EDGEGEN_MQTT_PASSWORD": "s3cret-pw"}
    agent = node_processes(docs, node, 8001, overrides)[-1]
    assert agent.env["EDGEGEN_MQTT_PASSWORD"] == "s3cret-pw"
    assert not any("s3cret-pw" in a for a in agent.argv)
    assert "--mqtt-username" in agent.argv and "mqtt://127.0.0.1:1883" in agent.argv


def test_the_secret_manifest_validates(tmp_path):
    from edge_agent.mqtt.credentials import write_broker_credentials
    from manifests.render import mqtt_secret

    creds = write_broker_credentials(tmp_path / "creds")
    secret = mqtt_secret("edge-prod", creds)
    validate(secret)
    assert set(secret["data"]) == {"passwd", "agent-password"}   # no device password in it
