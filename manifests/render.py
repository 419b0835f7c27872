"""Render the K3s resources for one deploy: jinja2 templates (package data) -> plain dicts.

Every value reaches the YAML through ``tojson`` (JSON is YAML), so a bundle name or a flag
can never break the document's structure. The output is a list of Kubernetes objects in
apply order; `write_manifests` lays them out as a Kustomize base (one file per object plus
``kustomization.yaml``) for users who keep their own overlays.
"""

from __future__ import annotations

import base64
import json
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import jinja2
import yaml

from edge_agent.mqtt.contract import AGENT_USER, broker_acl
from edge_agent.mqtt.credentials import BrokerCredentials, write_private
from edge_agent.version import VERSION
from manifests.errors import RenderError

# The Kubernetes minor of the K3s release these manifests target (K3s v1.35.x, stable
# channel); 1.35 is also where the Downward API sees the node's topology labels (KEP-4742).
K3S_KUBERNETES_VERSION = "1.35.0"
STORE_PATH = "/var/lib/edgegen/bundles"
TRUSTED_KEYS_PATH = "/etc/edgegen/trusted-keys"   # the trusted-keys ConfigMap, mounted
AGENT_PORT = 8000
ROUTER_PORT = 8080
MQTT_PORT = 1883
CONSUL_PORT = 8500
DEFAULT_IMAGE = f"ghcr.io/edgegen/edgegen:{VERSION}"
# The broker's credentials (`edgegen mqtt credentials` writes it): Mosquitto's hashed password
# file, mounted into the broker, and the agents' password, which reaches them as an env var.
MQTT_SECRET = "edgegen-mqtt"
MQTT_SECRET_PASSWD_KEY = "passwd"
MQTT_SECRET_AGENT_KEY = "agent-password"
MOSQUITTO_CONFIG_DIR = "/mosquitto/config"
MOSQUITTO_SECRET_DIR = "/mosquitto/secret"
HISTORY_LIMIT = 10

_TEMPLATES = Path(__file__).with_name("templates")
_env = jinja2.Environment(
    loader=jinja2.FileSystemLoader(str(_TEMPLATES)),
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
    keep_trailing_newline=True,
)
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_LABEL_KEY = re.compile(r"^([a-z0-9]([-a-z0-9.]*[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")
_LABEL_VALUE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?$")
_MAX_UNAVAILABLE = re.compile(r"^([1-9][0-9]*|([1-9][0-9]?|100)%)$")


@dataclass(frozen=True)
class BundleRef:
    """Which bundle to serve: its name, full sha256 digest and the URL nodes pull it from."""

    name: str
    digest: str
    url: str

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "BundleRef":
        return cls(name=str(d["name"]), digest=str(d["digest"]), url=str(d["url"]))


@dataclass(frozen=True)
class DeployConfig:
    """Everything one render depends on; `edgegen deploy` builds it from its flags."""

    bundle: BundleRef
    namespace: str = "edgegen"
    image: str = DEFAULT_IMAGE
    gpu_image: str = ""                      # default: image + "-gpu"
    mosquitto_image: str = "eclipse-mosquitto:2.0.21"
    node_selector: dict = field(default_factory=dict)  # extra labels for edge nodes
    max_unavailable: str = "1"               # DaemonSet rolling update: "1" or "25%"
    consul_address: str | None = None        # an existing Consul; None = install one (HelmChart)
    consul_chart_version: str = "1.7.2"
    central: bool = True                     # render the central GPU Deployment
    central_replicas: int = 1
    central_gpus: int = 1
    central_cpu: str = "2"
    central_memory: str = "8Gi"
    agent_cpu: str = "500m"
    agent_memory: str = "2Gi"
    max_concurrency: int = 4
    queue_size: int = 16
    drain_timeout: int = 30
    mqtt: bool = True                        # a Mosquitto broker per edge node
    mqtt_anonymous: bool = False             # devices may connect without a password (opt-in)
    router_replicas: int = 2
    router_host: str | None = None           # IngressRoute Host() match; None = any host
    entry_points: tuple = ("web",)
    tls_secret: str | None = None
    ingress_inflight_per_client: int = 64
    # A ConfigMap in the namespace whose *.pub entries are the trusted bundle signing keys:
    # the init container's pull and the agent refuse bundles no such key signed. None: no check.
    trusted_keys: str | None = None

    def with_bundle(self, bundle: BundleRef) -> "DeployConfig":
        return replace(self, bundle=bundle)

    def to_json(self) -> str:
        d = asdict(self)
        d["entry_points"] = list(self.entry_points)
        return json.dumps(d, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "DeployConfig":
        d = json.loads(text)
        d["bundle"] = BundleRef.from_dict(d["bundle"])
        d["entry_points"] = tuple(d.get("entry_points") or ("web",))
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in known})


def parse_selector(text: str | None) -> dict[str, str]:
    """``k=v,k2=v2`` -> dict. Only equality selectors: they become a DaemonSet nodeSelector."""
    out: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in (text or "").split(","))):
        key, sep, value = part.partition("=")
        key, value = key.strip(), value.strip().lstrip("=")
        if not sep or "!" in key or not key:
            raise RenderError(
                f"--nodes {text!r}: use equality selectors such as "
                f"'topology.kubernetes.io/region=eu-west,disk=ssd' ({part!r} is not one)"
            )
        if not _LABEL_KEY.match(key) or not _LABEL_VALUE.match(value) or len(value) > 63:
            raise RenderError(f"--nodes: {part!r} is not a valid Kubernetes label")
        out[key] = value
    return out


def check_config(cfg: DeployConfig) -> None:
    """Refuse a config that would render manifests the API server rejects, naming the flag."""
    if not _DNS_LABEL.match(cfg.namespace) or len(cfg.namespace) > 63:
        raise RenderError(f"--namespace {cfg.namespace!r} is not a valid namespace name "
                          "(lower-case letters, digits and '-')")
    if not _MAX_UNAVAILABLE.match(str(cfg.max_unavailable)):
        raise RenderError(f"--max-unavailable {cfg.max_unavailable!r}: give a number of nodes "
                          "(1, 2, ...) or a percentage (1%..100%)")
    if not re.fullmatch(r"[0-9a-f]{64}", cfg.bundle.digest):
        raise RenderError(f"bundle digest {cfg.bundle.digest!r} is not a sha256 hex digest")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", cfg.bundle.name):
        raise RenderError(f"bundle name {cfg.bundle.name!r} cannot be used in a path")
    if not re.match(r"^(https?|file)://", cfg.bundle.url):
        raise RenderError(f"bundle URL {cfg.bundle.url!r} must be http(s):// (or file:// for "
                          "--target local)")
    if cfg.consul_address is not None and not re.match(r"^https?://[^/]+", cfg.consul_address):
        raise RenderError(f"--consul-address {cfg.consul_address!r} must look like "
                          "http://consul.example:8500")
    if cfg.router_host is not None and not re.fullmatch(
            r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*", cfg.router_host):
        raise RenderError(f"--host {cfg.router_host!r} is not a DNS name")
    if cfg.trusted_keys is not None and (not _DNS_LABEL.match(cfg.trusted_keys)
                                         or len(cfg.trusted_keys) > 63):
        raise RenderError(f"trusted keys ConfigMap {cfg.trusted_keys!r} is not a valid name "
                          "(lower-case letters, digits and '-')")
    if cfg.central_replicas < 0 or cfg.router_replicas < 1:
        raise RenderError("replica counts must be positive")


def consul_url(cfg: DeployConfig) -> str:
    """Where pods reach Consul: the given address, or the client agent on their own node."""
    return cfg.consul_address or f"http://$(HOST_IP):{CONSUL_PORT}"


def mosquitto_conf(port: int = MQTT_PORT, data_dir: str = "/mosquitto/data/", *,
                   password_file: str, acl_file: str, allow_anonymous: bool = False,
                   host: str | None = None, user: str | None = None) -> str:
    """Mosquitto's configuration for an edge broker (also written by `edgegen up` and the
    tests' brokers).

    Locked by default: clients log in from ``password_file`` and may only do what
    ``acl_file`` (``contract.broker_acl``) grants; ``allow_anonymous`` lets devices in without
    a password (the ACL still applies to them). Persistence keeps the agents' sessions (and
    replies queued for them) across a broker restart; TCP_NODELAY stops Nagle from holding
    each streamed chunk back ~40 ms. ``user``: the account mosquitto runs as when started as
    root (else it switches to ``mosquitto``, which cannot read 0600 files of another user).
    """
    return (
        f"# edgegen edge broker\nlistener {port}{f' {host}' if host else ''}\n"
        f"allow_anonymous {'true' if allow_anonymous else 'false'}\n"
        f"password_file {password_file}\nacl_file {acl_file}\n"
        + (f"user {user}\n" if user else "")
        + f"persistence true\npersistence_location {data_dir}\nautosave_interval 30\n"
        "set_tcp_nodelay true\nmax_inflight_messages 100\nlog_dest stderr\n"
    )


def mqtt_secret(namespace: str, creds: BrokerCredentials) -> dict:
    """The Secret the rendered broker and agents read (``MQTT_SECRET``), from ``creds``."""
    def b64(path: Path) -> str:
        return base64.b64encode(path.read_bytes()).decode()

    agent_password = creds.agent_password().encode()
    return {
        "apiVersion": "v1", "kind": "Secret", "type": "Opaque",
        "metadata": {"name": MQTT_SECRET, "namespace": namespace,
                     "labels": {"app.kubernetes.io/part-of": "edgegen",
                                "app.kubernetes.io/component": "mqtt-broker"}},
        "data": {MQTT_SECRET_PASSWD_KEY: b64(creds.passwd),
                 MQTT_SECRET_AGENT_KEY: base64.b64encode(agent_password).decode()},
    }


def write_mqtt_secret(creds: BrokerCredentials, namespace: str = "edgegen") -> Path:
    """Write ``mqtt_secret`` as ``secret.yaml`` (0600) beside the credentials."""
    path = creds.directory / "secret.yaml"
    write_private(path, yaml.safe_dump(mqtt_secret(namespace, creds), sort_keys=False))
    return path


def _consul_values() -> str:
    return yaml.safe_dump({
        "global": {"name": "consul", "datacenter": "edge"},
        "server": {"replicas": 1},
        "client": {"enabled": True},
        "connectInject": {"enabled": False},
        "ui": {"enabled": True},
    }, sort_keys=True)


def _route_match(cfg: DeployConfig) -> str:
    paths = "(PathPrefix(`/v1`) || PathPrefix(`/edgegen`))"
    return f"Host(`{cfg.router_host}`) && {paths}" if cfg.router_host else paths


def render(cfg: DeployConfig, history: list[BundleRef] | None = None) -> list[dict]:
    """The Kubernetes objects for ``cfg``, in apply order. ``history`` lists the bundles
    served before this one, newest first; it is kept in the ConfigMap for rollback."""
    check_config(cfg)
    history = [h for h in (history or []) if h.digest != cfg.bundle.digest][:HISTORY_LIMIT]
    edge_selector = {**cfg.node_selector, "edgegen.io/tier": "edge"}
    ctx = {
        "cfg": cfg,
        "version": VERSION,
        "agent_port": AGENT_PORT,
        "router_port": ROUTER_PORT,
        "mqtt_port": MQTT_PORT,
        "store_path": STORE_PATH,
        "trusted_keys_path": TRUSTED_KEYS_PATH,
        "consul_url": consul_url(cfg),
        "edge_selector": edge_selector,
        "history_json": json.dumps([h.to_dict() for h in history]),
        "deploy_json": cfg.to_json(),
        "mosquitto_conf": mosquitto_conf(
            MQTT_PORT, password_file=f"{MOSQUITTO_SECRET_DIR}/{MQTT_SECRET_PASSWD_KEY}",
            acl_file=f"{MOSQUITTO_CONFIG_DIR}/acl", allow_anonymous=cfg.mqtt_anonymous),
        "mosquitto_acl": broker_acl(),
        "mqtt_secret": MQTT_SECRET,
        "mqtt_secret_passwd_key": MQTT_SECRET_PASSWD_KEY,
        "mqtt_secret_agent_key": MQTT_SECRET_AGENT_KEY,
        "mosquitto_secret_dir": MOSQUITTO_SECRET_DIR,
        "mqtt_agent_user": AGENT_USER,
        "consul_values": _consul_values(),
        "route_match": _route_match(cfg),
    }
    cfg = replace(cfg, gpu_image=cfg.gpu_image or f"{cfg.image}-gpu")
    ctx["cfg"] = cfg
    names = ["namespace", "serviceaccounts", "configmap", "edge-daemonset"]
    if cfg.central and cfg.central_replicas > 0:
        names.append("central-deployment")
    names.append("router")
    if cfg.mqtt:
        names.append("mosquitto")
    if cfg.consul_address is None:
        names.append("consul-helmchart")
    docs: list[dict] = []
    for name in names:
        try:
            text = _env.get_template(f"{name}.yaml.j2").render(**ctx)
            docs.extend(d for d in yaml.safe_load_all(text) if d)
        except (jinja2.TemplateError, yaml.YAMLError) as exc:
            raise RenderError(f"template {name}.yaml.j2 failed to render: {exc}") from exc
    return docs


def to_yaml(docs: list[dict]) -> str:
    """One multi-document YAML stream (what `edgegen deploy --dry-run` prints)."""
    return yaml.safe_dump_all(docs, sort_keys=False, default_flow_style=False)


def file_name(doc: dict) -> str:
    kind = doc["kind"].lower()
    return f"{kind}-{doc['metadata']['name']}.yaml"


def write_manifests(docs: list[dict], out_dir: str | Path) -> list[Path]:
    """Write a Kustomize base: one file per object and a ``kustomization.yaml`` naming them."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for doc in docs:
        p = out / file_name(doc)
        p.write_text(yaml.safe_dump(doc, sort_keys=False))
        paths.append(p)
    kustomization = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": [p.name for p in paths],
    }
    k = out / "kustomization.yaml"
    k.write_text(yaml.safe_dump(kustomization, sort_keys=False))
    return [*paths, k]


def find(docs: list[dict], kind: str, name: str) -> dict:
    """The rendered object of ``kind`` named ``name``."""
    for d in docs:
        if d["kind"] == kind and d["metadata"]["name"] == name:
            return d
    raise KeyError(f"{kind}/{name} not rendered")
