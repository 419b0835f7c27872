"""Turn rendered container specs into local process specs, one per node of a cluster file.

Pure: the same ``command``/``args``/``env`` the kubelet would run, with what the cluster
would provide filled in from the node (Downward API fields, hostPath, ports) and ``$(VAR)``
references expanded the way Kubernetes expands them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from manifests.errors import RenderError
from manifests.render import find

DEFAULT_CLUSTER = Path(__file__).with_name("cluster.yaml")
_REF = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


@dataclass(frozen=True)
class Node:
    name: str
    tier: str = "edge"
    region: str = ""
    zone: str = ""
    lat: float | None = None
    lon: float | None = None


@dataclass(frozen=True)
class ProcessSpec:
    name: str                 # node/container
    argv: tuple[str, ...]     # command + args, expanded
    env: dict
    port: int | None = None   # the HTTP port it serves, if any
    init: bool = False        # run to completion before the node's main container


def load_cluster(path: str | Path | None = None) -> list[Node]:
    """Nodes of a cluster file (YAML: ``nodes: [{name, region, zone, lat, lon, tier}]``)."""
    p = Path(path) if path else DEFAULT_CLUSTER
    try:
        doc = yaml.safe_load(p.read_text())
        nodes = [Node(**n) for n in doc["nodes"]]
    except (OSError, yaml.YAMLError, KeyError, TypeError) as exc:
        raise RenderError(f"cannot read the cluster file {p}: {exc}") from exc
    bad = [n.name for n in nodes if n.tier not in ("edge", "central")]
    if bad or len({n.name for n in nodes}) != len(nodes):
        raise RenderError(f"cluster file {p}: node names must be unique and tier edge or "
                          f"central ({', '.join(bad) or 'duplicate names'})")
    return nodes


def expand(value: str, env: dict) -> str:
    """Kubernetes' $(VAR) expansion: known variables are replaced, unknown ones kept."""
    return _REF.sub(lambda m: str(env.get(m.group(1), m.group(0))), value)


def _field(path: str, node: Node) -> str:
    fields = {
        "spec.nodeName": node.name, "status.podIP": "127.0.0.1", "status.hostIP": "127.0.0.1",
        "metadata.labels['topology.kubernetes.io/region']": node.region,
        "metadata.labels['topology.kubernetes.io/zone']": node.zone,
    }
    if path not in fields:
        raise RenderError(f"--target local cannot provide the Downward API field {path}")
    return fields[path]


def container_env(container: dict, node: Node, overrides: dict,
                  configmaps: dict[str, dict] | None = None) -> dict:
    """The container's environment on ``node``: literal values expanded in order, fieldRefs
    from the node, configMapKeyRefs from the rendered ``configmaps`` (name -> data), then
    ``overrides`` (what differs on one machine: ports, URLs, paths)."""
    env: dict[str, str] = {}
    for e in container.get("env") or []:
        name = e["name"]
        if name in overrides:
            env[name] = str(overrides[name])
        elif "value" in e:
            env[name] = expand(str(e["value"]), env)
        elif "secretKeyRef" in e["valueFrom"]:   # the fleet passes secrets as overrides
            ref = e["valueFrom"]["secretKeyRef"]
            if ref.get("optional"):   # as the kubelet does for a Secret that is not there
                continue
            raise RenderError(f"--target local has no Secret {ref['name']} (key {ref['key']}) "
                              f"for {name}")
        elif "configMapKeyRef" in e["valueFrom"]:
            ref = e["valueFrom"]["configMapKeyRef"]
            try:
                env[name] = str((configmaps or {})[ref["name"]][ref["key"]])
            except KeyError:
                raise RenderError(f"no ConfigMap {ref['name']} (key {ref['key']}) for "
                                  f"{name}") from None
        else:
            env[name] = _field(e["valueFrom"]["fieldRef"]["fieldPath"], node)
    return env


def _argv(container: dict, env: dict, edgegen: tuple[str, ...]) -> tuple[str, ...]:
    cmd = [expand(a, env) for a in (container.get("command") or []) + (container.get("args") or [])]
    # A pod listens on all of its own addresses; on one shared machine, loopback only.
    cmd = ["127.0.0.1" if a == "0.0.0.0" else a for a in cmd]
    if cmd and cmd[0] == "edgegen":
        cmd = [*edgegen, *cmd[1:]]
    return tuple(cmd)


def node_processes(docs: list[dict], node: Node, port: int, overrides: dict,
                   edgegen: tuple[str, ...] = ("edgegen",)) -> list[ProcessSpec]:
    """The bundle-pull init container and the agent of ``node``, from the rendered
    edge DaemonSet or central Deployment."""
    workload = (find(docs, "DaemonSet", "edgegen-edge") if node.tier == "edge"
                else find(docs, "Deployment", "edgegen-central"))
    pod = workload["spec"]["template"]["spec"]
    configmaps = {d["metadata"]["name"]: d.get("data") or {} for d in docs
                  if d["kind"] == "ConfigMap"}
    out = []
    for c in pod.get("initContainers") or []:
        env = container_env(c, node, overrides, configmaps)
        out.append(ProcessSpec(f"{node.name}/{c['name']}", _argv(c, env, edgegen), env, init=True))
    for c in pod["containers"]:
        env = container_env(c, node, {**overrides, "EDGEGEN_PORT": port}, configmaps)
        argv = list(_argv(c, env, edgegen))
        if node.tier == "central":  # no GPU here: the central tier runs on the CPU
            argv[argv.index("--device") + 1] = "cpu"
        if node.lat is not None and node.lon is not None:
            argv += ["--lat", str(node.lat), "--lon", str(node.lon)]
        out.append(ProcessSpec(f"{node.name}/{c['name']}", tuple(argv), env, port=port))
    return out


def router_process(docs: list[dict], port: int, overrides: dict,
                   edgegen: tuple[str, ...] = ("edgegen",)) -> ProcessSpec:
    c = find(docs, "Deployment", "edgegen-router")["spec"]["template"]["spec"]["containers"][0]
    env = container_env(c, Node("router"), {**overrides, "EDGEGEN_PORT": port})
    return ProcessSpec("router", _argv(c, env, edgegen), env, port=port)
