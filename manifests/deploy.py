"""Deploy to K3s without restarting the edge.

The first deploy applies the rendered objects and watches the edge DaemonSet come up: each
pod's init container pulls the bundle the ``edgegen-bundle`` ConfigMap names. After that, a
new bundle never changes the DaemonSet's template (K3s restarts nothing): it goes out as a
fleet rollout through the nodes' desired state in Consul's KV store (``manifests
.fleet_rollout``: pre-pull, waves, health gates, rollback from each node's cache), reached
through the API server's proxy to the cluster's Consul. The ConfigMap is written when the
rollout completed, so a node that joins or restarts later seeds itself with the fleet's
bundle. ``manifests.kube`` does the talking, ``manifests.rollout`` the deciding about
DaemonSet pods; this module is the loop between them.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Callable

from manifests.consul_kv import ConsulKV
from manifests.errors import ClusterError, DeployError, RolloutFailed
from manifests.fleet_metrics import MetricsSource, PodProxyMetrics, PrometheusMetrics
from manifests.fleet_rollout import FleetRollout, RolloutOptions, RolloutView
from manifests.kube import KubeClient
from manifests.render import AGENT_PORT, CONSUL_PORT, BundleRef, DeployConfig, render
from manifests.rollout import COMPLETE, FAILED, RolloutDecision, decide

log = logging.getLogger(__name__)

EDGE_DAEMONSET = "edgegen-edge"
CONFIGMAP = "edgegen-bundle"
HISTORY_ANNOTATION = "edgegen.io/history"
EDGE_POD_SELECTOR = "app.kubernetes.io/name=edgegen,app.kubernetes.io/component=edge-agent"
AGENT_POD_SELECTOR = ("app.kubernetes.io/name=edgegen,"
                      "app.kubernetes.io/component in (edge-agent,central-agent)")

# The Consul the Helm chart installs (global.name "consul", in namespace "consul").
CONSUL_SERVICE = ("consul", "consul-server", CONSUL_PORT)

Progress = Callable[[RolloutDecision | RolloutView], None]


@dataclass
class Fleet:
    """How a deploy reaches the fleet's desired state and the agents' figures."""

    kv: ConsulKV
    metrics: MetricsSource
    options: RolloutOptions


def fleet_access(client: KubeClient, cfg: DeployConfig, options: RolloutOptions,
                 consul: str | None = None, token: str | None = None,
                 prometheus: str | None = None) -> Fleet:
    """Consul at ``consul``, else at the deploy's ``consul_address``, else the in-cluster one
    through the API server's service proxy; figures from ``prometheus`` when given, else each
    agent's /metrics through the API server's pod proxy."""
    address = consul or cfg.consul_address
    if address:
        kv = ConsulKV(address, token)
    else:
        ns, svc, port = CONSUL_SERVICE
        kv = ConsulKV(f"{client.host} (service {ns}/{svc}:{port})", token,
                      http=client.proxy_client(ns, "Service", svc, port))
    metrics = (PrometheusMetrics(prometheus) if prometheus else
               PodProxyMetrics(client, cfg.namespace, AGENT_PORT, EDGE_POD_SELECTOR))
    return Fleet(kv, metrics, options)


@dataclass(frozen=True)
class DeployedState:
    """What the cluster's ConfigMap says is deployed: the config and the bundles before it."""

    config: DeployConfig
    history: list[BundleRef]


def node_selector_string(cfg: DeployConfig) -> str:
    labels = {**cfg.node_selector, "edgegen.io/tier": "edge"}
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items()))


def read_deployed(client: KubeClient, namespace: str) -> DeployedState | None:
    """The deploy recorded in the namespace's ConfigMap, or None before the first deploy."""
    cm = client.get("v1", "ConfigMap", CONFIGMAP, namespace)
    if cm is None:
        return None
    data = cm.get("data") or {}
    try:
        config = DeployConfig.from_json(data["deploy.json"])
        raw = (cm["metadata"].get("annotations") or {}).get(HISTORY_ANNOTATION, "[]")
        history = [BundleRef.from_dict(h) for h in json.loads(raw)]
    except (KeyError, ValueError, TypeError) as exc:
        raise ClusterError(f"ConfigMap {namespace}/{CONFIGMAP} is not one edgegen wrote: "
                           f"{exc}") from exc
    return DeployedState(config, history)


def check_nodes(client: KubeClient, cfg: DeployConfig) -> list[dict]:
    """The edge nodes the DaemonSet will run on; a clear error when there are none."""
    selector = node_selector_string(cfg)
    nodes = client.list("v1", "Node", label_selector=selector)
    if not nodes:
        raise ClusterError(
            f"no nodes match the selector {selector}: label your edge nodes with "
            "`kubectl label node NAME edgegen.io/tier=edge` (and check --nodes)"
        )
    return nodes


def apply_all(client: KubeClient, docs: list[dict], force: bool = False) -> None:
    for doc in docs:
        client.apply(doc, force=force)
        log.info("applied", extra={"kind": doc["kind"], "name": doc["metadata"]["name"]})


def wait_rollout(client: KubeClient, namespace: str, digest: str | None, timeout: float,
                 on_progress: Progress | None = None, crash_restarts: int = 2,
                 clock: Callable[[], float] = time.monotonic) -> RolloutDecision:
    """Watch the edge DaemonSet until its pods run the current template (and ``digest``,
    when their template names one), or fail.

    The DaemonSet is watched (so a change is seen at once); pods are listed after each event
    and at least every few seconds, because a crash-looping pod changes no DaemonSet field.
    """
    start = clock()
    while True:
        elapsed = clock() - start
        ds = client.get("apps/v1", "DaemonSet", EDGE_DAEMONSET, namespace)
        if ds is None:
            raise ClusterError(f"DaemonSet {namespace}/{EDGE_DAEMONSET} vanished during rollout")
        pods = client.list("v1", "Pod", namespace, EDGE_POD_SELECTOR)
        decision = decide(ds, pods, digest, elapsed, timeout, crash_restarts)
        if on_progress:
            on_progress(decision)
        if decision.state in (COMPLETE, FAILED):
            return decision
        window = max(1, min(5, int(timeout - elapsed) + 1))
        rv = (ds.get("metadata") or {}).get("resourceVersion")
        for _event in client.watch("apps/v1", "DaemonSet", namespace, EDGE_DAEMONSET, window,
                                   resource_version=rv):
            break  # something changed: re-evaluate at once


def _generation(client: KubeClient, namespace: str) -> int | None:
    ds = client.get("apps/v1", "DaemonSet", EDGE_DAEMONSET, namespace)
    return None if ds is None else int(ds["metadata"].get("generation") or 0)


def _split_configmap(docs: list[dict]) -> tuple[dict, list[dict]]:
    cm = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == CONFIGMAP)
    return cm, [d for d in docs if d is not cm]


def _failed(what: str, decision: RolloutDecision, cfg: DeployConfig,
            back: str = "") -> RolloutFailed:
    pull_failed = any("bundle pull" in n.detail for n in decision.nodes)
    hint = (f" (the nodes could not pull {cfg.bundle.url}: is it reachable from the cluster?)"
            if pull_failed else "")
    return RolloutFailed(
        f"{what} of {cfg.bundle.name} {cfg.bundle.digest[:12]} failed on "
        f"{', '.join(decision.failing_nodes) or 'no node'}: {decision.reason}{hint}{back}",
        list(decision.failing_nodes))


def deploy(client: KubeClient, cfg: DeployConfig, timeout: float = 600.0,
           on_progress: Progress | None = None, force_conflicts: bool = False,
           fleet: Fleet | None = None) -> RolloutDecision | RolloutView:
    """Apply ``cfg``; the first time, wait for the edge pods; after that, roll the bundle out
    through ``fleet`` (nothing restarts). A failure restores the previous objects, rolls
    switched nodes back from their caches, and raises `RolloutFailed` naming the nodes."""
    check_nodes(client, cfg)
    previous = read_deployed(client, cfg.namespace)
    generation = _generation(client, cfg.namespace)
    history = [] if previous is None else [previous.config.bundle, *previous.history]
    if previous is None or generation is None:    # no edge pods yet: they seed with cfg's
        apply_all(client, render(cfg, history), force=force_conflicts)
        decision = wait_rollout(client, cfg.namespace, None, timeout, on_progress)
        if decision.state != COMPLETE:
            raise _failed("deploy", decision, cfg)
        return decision
    rollout = None
    if cfg.bundle.digest != previous.config.bundle.digest:   # checked before applying
        if fleet is None:
            raise ClusterError("a new bundle goes out through the fleet's desired state: "
                               "deploy needs Consul (see `edgegen deploy --consul`)")
        rollout = FleetRollout(fleet.kv, cfg.bundle.digest, cfg.bundle.url, fleet.options,
                               progress=on_progress or (lambda view: None),
                               metrics=fleet.metrics)
    configmap, others = _split_configmap(render(cfg, history))
    apply_all(client, others, force=force_conflicts)

    def restore(reason: str) -> str:
        apply_all(client, _split_configmap(render(previous.config, previous.history))[1],
                  force=force_conflicts)
        return f"; {reason}, and the cluster's objects are back to the previous deploy"

    result: RolloutDecision | RolloutView
    restarted = _generation(client, cfg.namespace) != generation
    if restarted:
        # A changed setting (image, resources, ...) restarts the edge pods: watch them.
        result = wait_rollout(client, cfg.namespace, None, timeout, on_progress)
        if result.state != COMPLETE:
            raise _failed("the edge pods' update", result, cfg, restore("not applied"))
    if rollout is not None:
        try:
            result = rollout.run()
        except RolloutFailed as exc:
            raise RolloutFailed(
                f"rollout of {cfg.bundle.name} {cfg.bundle.digest[:12]} failed: {exc}"
                f"{restore('switched nodes went back to their last good bundle from disk')}",
                exc.failing_nodes or [n for n, r in rollout.view.nodes.items()
                                      if r.state in ("failed", "rolled back")]) from exc
        except DeployError:    # refused before anything switched (another rollout runs)
            restore("nothing switched")
            raise
    elif not restarted:   # nothing changed: confirm the pods are ready
        result = wait_rollout(client, cfg.namespace, None, timeout, on_progress)
    client.apply(configmap, force=force_conflicts)   # the record of a completed rollout
    return result


def rollback(client: KubeClient, namespace: str, timeout: float = 600.0,
             on_progress: Progress | None = None, force_conflicts: bool = False,
             fleet: Fleet | None = None) -> tuple[BundleRef, RolloutDecision | RolloutView]:
    """Go back to the bundle served before the current one: a fleet rollout to a bundle the
    nodes still have on disk (no download), then the record."""
    state = read_deployed(client, namespace)
    if state is None:
        raise ClusterError(f"nothing is deployed in namespace {namespace}: no ConfigMap "
                           f"{CONFIGMAP}")
    if not state.history:
        raise ClusterError(f"no earlier bundle to roll back to in namespace {namespace}")
    target = state.history[0]
    cfg = state.config.with_bundle(target)
    return target, deploy(client, cfg, timeout, on_progress, force_conflicts, fleet)


@dataclass(frozen=True)
class AgentRow:
    node: str
    tier: str
    bundle: str        # name digest12
    ready: bool
    address: str
    detail: str = ""


def cluster_status(client: KubeClient, namespace: str, kv: ConsulKV | None = None
                   ) -> list[AgentRow]:
    """Every agent pod of the namespace: node, tier, bundle, readiness. An edge node's bundle
    is the one its agent reports in Consul (``kv``); without it, the ConfigMap's, marked as
    the bundle the pod started on."""
    from edge_agent.desired import DesiredStateError, NodeStatus

    state = read_deployed(client, namespace)
    names = {} if state is None else {b.digest: b.name for b in
                                      (state.config.bundle, *state.history)}
    served: dict[str, NodeStatus] = {}
    if kv is not None:
        try:
            for key, raw in kv.get_prefix("edgegen/nodes/").items():
                if key.endswith("/status"):
                    served[key.split("/")[2]] = NodeStatus.from_json(raw)
        except (DesiredStateError, DeployError) as exc:
            log.warning("cannot read the nodes' status from Consul", extra={"error": str(exc)})
    rows = []
    for pod in client.list("v1", "Pod", namespace, AGENT_POD_SELECTOR):
        meta, spec, st = pod["metadata"], pod.get("spec") or {}, pod.get("status") or {}
        ann = meta.get("annotations") or {}
        comp = (meta.get("labels") or {}).get("app.kubernetes.io/component", "")
        node = spec.get("nodeName", "")
        ready = any(c.get("type") == "Ready" and c.get("status") == "True"
                    for c in st.get("conditions") or [])
        detail = st.get("phase", "")
        if comp == "central-agent":
            bundle = f"{ann.get('edgegen.io/bundle-name', '?')} " \
                     f"{ann.get('edgegen.io/bundle-digest', '')[:12]}"
        elif node in served:
            digest = served[node].serving
            bundle = f"{names.get(digest, '?')} {digest[:12]}"
            detail = f"{detail}, {served[node].state}"
        elif state is not None:
            bundle = f"{state.config.bundle.name} {state.config.bundle.digest[:12]} (seed)"
        else:
            bundle = "?"
        rows.append(AgentRow(node=node, tier="central" if comp == "central-agent" else "edge",
                             bundle=bundle, ready=ready, address=st.get("podIP", ""),
                             detail=detail))
    return sorted(rows, key=lambda r: (r.tier, r.node))
