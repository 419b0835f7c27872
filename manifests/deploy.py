"""Deploy to K3s: apply the rendered objects, watch the edge DaemonSet roll out, roll back
to the previous bundle when it fails. `manifests.kube` does the talking, `manifests.rollout`
the deciding; this module is the loop between them.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Callable

from manifests.errors import ClusterError, RolloutFailed
from manifests.kube import KubeClient
from manifests.render import BundleRef, DeployConfig, render
from manifests.rollout import COMPLETE, FAILED, RolloutDecision, decide

log = logging.getLogger(__name__)

EDGE_DAEMONSET = "edgegen-edge"
CONFIGMAP = "edgegen-bundle"
HISTORY_ANNOTATION = "edgegen.io/history"
EDGE_POD_SELECTOR = "app.kubernetes.io/name=edgegen,app.kubernetes.io/component=edge-agent"
AGENT_POD_SELECTOR = ("app.kubernetes.io/name=edgegen,"
                      "app.kubernetes.io/component in (edge-agent,central-agent)")

Progress = Callable[[RolloutDecision], None]


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


def wait_rollout(client: KubeClient, namespace: str, digest: str, timeout: float,
                 on_progress: Progress | None = None, crash_restarts: int = 2,
                 clock: Callable[[], float] = time.monotonic) -> RolloutDecision:
    """Watch the edge DaemonSet until the rollout of ``digest`` completes or fails.

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


def deploy(client: KubeClient, cfg: DeployConfig, timeout: float = 600.0,
           on_progress: Progress | None = None, force_conflicts: bool = False,
           rollback_on_failure: bool = True) -> RolloutDecision:
    """Apply ``cfg`` and wait for the rollout; on failure roll back to the previous bundle
    and raise `RolloutFailed` naming the nodes that failed."""
    check_nodes(client, cfg)
    previous = read_deployed(client, cfg.namespace)
    history: list[BundleRef] = []
    if previous is not None:
        history = [previous.config.bundle, *previous.history]
    apply_all(client, render(cfg, history), force=force_conflicts)
    decision = wait_rollout(client, cfg.namespace, cfg.bundle.digest, timeout, on_progress)
    if decision.state == COMPLETE:
        return decision
    failing = list(decision.failing_nodes)
    back = ""
    if rollback_on_failure and previous is not None and \
            previous.config.bundle.digest != cfg.bundle.digest:
        prev_cfg = cfg.with_bundle(previous.config.bundle)
        apply_all(client, render(prev_cfg, previous.history), force=force_conflicts)
        back = (f"; rolled back to {previous.config.bundle.name} "
                f"{previous.config.bundle.digest[:12]}")
        wait_rollout(client, cfg.namespace, prev_cfg.bundle.digest, timeout, on_progress)
    pull_failed = any("bundle pull" in n.detail for n in decision.nodes)
    hint = (f" (the nodes could not pull {cfg.bundle.url}: is it reachable from the cluster?)"
            if pull_failed else "")
    raise RolloutFailed(
        f"rollout of {cfg.bundle.name} {cfg.bundle.digest[:12]} failed on "
        f"{', '.join(failing) or 'no node'}: {decision.reason}{hint}{back}",
        failing,
    )


def rollback(client: KubeClient, namespace: str, timeout: float = 600.0,
             on_progress: Progress | None = None, force_conflicts: bool = False
             ) -> tuple[BundleRef, RolloutDecision]:
    """Go back to the bundle served before the current one, and wait for it."""
    state = read_deployed(client, namespace)
    if state is None:
        raise ClusterError(f"nothing is deployed in namespace {namespace}: no ConfigMap "
                           f"{CONFIGMAP}")
    if not state.history:
        raise ClusterError(f"no earlier bundle to roll back to in namespace {namespace}")
    target = state.history[0]
    cfg = state.config.with_bundle(target)
    apply_all(client, render(cfg, state.history[1:]), force=force_conflicts)
    decision = wait_rollout(client, namespace, target.digest, timeout, on_progress)
    if decision.state != COMPLETE:
        raise RolloutFailed(
            f"rollback to {target.name} {target.digest[:12]} failed on "
            f"{', '.join(decision.failing_nodes) or 'no node'}: {decision.reason}",
            list(decision.failing_nodes),
        )
    return target, decision


@dataclass(frozen=True)
class AgentRow:
    node: str
    tier: str
    bundle: str        # name digest12
    ready: bool
    address: str
    detail: str = ""


def cluster_status(client: KubeClient, namespace: str) -> list[AgentRow]:
    """Every agent pod of the namespace: node, tier, bundle digest, readiness."""
    rows = []
    for pod in client.list("v1", "Pod", namespace, AGENT_POD_SELECTOR):
        meta, spec, st = pod["metadata"], pod.get("spec") or {}, pod.get("status") or {}
        ann = meta.get("annotations") or {}
        comp = (meta.get("labels") or {}).get("app.kubernetes.io/component", "")
        ready = any(c.get("type") == "Ready" and c.get("status") == "True"
                    for c in st.get("conditions") or [])
        rows.append(AgentRow(
            node=spec.get("nodeName", ""),
            tier="central" if comp == "central-agent" else "edge",
            bundle=f"{ann.get('edgegen.io/bundle-name', '?')} "
                   f"{ann.get('edgegen.io/bundle-digest', '')[:12]}",
            ready=ready,
            address=st.get("podIP", ""),
            detail=st.get("phase", ""),
        ))
    return sorted(rows, key=lambda r: (r.tier, r.node))
