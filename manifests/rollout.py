"""The rollout decision, pure: DaemonSet status + its pods (plain dicts, as the API returns
them) + the time spent -> progressing, complete or failed, with one row per node.

No clock and no I/O: `manifests.deploy` feeds it what it watched, tests feed it tables.
"""

from __future__ import annotations

from dataclasses import dataclass

DIGEST_ANNOTATION = "edgegen.io/bundle-digest"
# Reasons a container cannot start that waiting will not cure.
STUCK_REASONS = frozenset({
    "CrashLoopBackOff", "ImagePullBackOff", "ErrImagePull", "InvalidImageName",
    "CreateContainerConfigError", "CreateContainerError", "RunContainerError",
})
PROGRESSING, COMPLETE, FAILED = "progressing", "complete", "failed"


@dataclass(frozen=True)
class NodeState:
    """One node's pod as the rollout sees it."""

    node: str
    pod: str
    digest: str          # the bundle digest in the pod's template annotation
    ready: bool
    phase: str           # ready | starting | pulling bundle | crash-looping | old bundle
    detail: str = ""     # e.g. the waiting reason and restart count
    restarts: int = 0


@dataclass(frozen=True)
class RolloutDecision:
    state: str                       # progressing | complete | failed
    reason: str
    failing_nodes: tuple[str, ...]
    nodes: tuple[NodeState, ...]
    desired: int
    updated: int
    ready: int


def node_state(pod: dict, target_digest: str | None, crash_restarts: int) -> NodeState:
    """Classify one pod: is it on the target bundle (None: any), ready, still starting, or
    stuck?"""
    meta = pod.get("metadata") or {}
    spec = pod.get("spec") or {}
    status = pod.get("status") or {}
    digest = (meta.get("annotations") or {}).get(DIGEST_ANNOTATION, "")
    ready = any(c.get("type") == "Ready" and c.get("status") == "True"
                for c in status.get("conditions") or [])
    node = spec.get("nodeName") or "(unscheduled)"
    name = meta.get("name", "")
    if target_digest is not None and digest != target_digest:
        return NodeState(node, name, digest, ready, "old bundle")
    init = status.get("initContainerStatuses") or []
    main = status.get("containerStatuses") or []
    for statuses, where in ((init, "bundle pull"), (main, "agent")):
        for cs in statuses:
            waiting = (cs.get("state") or {}).get("waiting") or {}
            restarts = int(cs.get("restartCount") or 0)
            reason = waiting.get("reason", "")
            if reason in STUCK_REASONS and (reason != "CrashLoopBackOff"
                                            or restarts >= crash_restarts):
                msg = waiting.get("message") or ""
                detail = f"{where}: {reason}, {restarts} restarts" + (f": {msg}" if msg else "")
                return NodeState(node, name, digest, False, "crash-looping", detail, restarts)
    if ready:
        return NodeState(node, name, digest, True, "ready")
    pulling = any(not (cs.get("state") or {}).get("terminated") for cs in init)
    return NodeState(node, name, digest, False, "pulling bundle" if pulling else "starting")


def decide(daemonset: dict, pods: list[dict], target_digest: str | None, elapsed: float,
           timeout: float, crash_restarts: int = 2) -> RolloutDecision:
    """Where the rollout of the DaemonSet's template (and ``target_digest``) stands.

    Complete: the controller has seen the new spec (observedGeneration), every scheduled
    node runs an updated pod (updatedNumberScheduled) and all are ready (numberReady), and
    each pod carries the target digest, when one is given (an edge template that names no
    bundle: ``manifests.deploy``). Failed: a pod with the new bundle crash-loops, or
    ``timeout`` passed first; the failing nodes are those not ready on the new bundle.
    """
    meta = daemonset.get("metadata") or {}
    st = daemonset.get("status") or {}
    generation = int(meta.get("generation") or 0)
    observed = int(st.get("observedGeneration") or 0)
    desired = int(st.get("desiredNumberScheduled") or 0)
    updated = int(st.get("updatedNumberScheduled") or 0)
    ready = int(st.get("numberReady") or 0)
    nodes = tuple(sorted((node_state(p, target_digest, crash_restarts) for p in pods),
                         key=lambda n: n.node))

    def result(state: str, reason: str, failing: tuple[str, ...] = ()) -> RolloutDecision:
        return RolloutDecision(state, reason, failing, nodes, desired, updated, ready)

    crashing = tuple(n.node for n in nodes if n.phase == "crash-looping")
    if crashing:
        details = "; ".join(f"{n.node}: {n.detail}" for n in nodes if n.phase == "crash-looping")
        return result(FAILED, f"pods with the new bundle are crash-looping ({details})", crashing)
    if observed < generation:
        done = False
        reason = f"waiting for the controller to observe generation {generation}"
    elif desired == 0:
        done = False
        reason = "no node runs a pod yet (desiredNumberScheduled is 0)"
    else:
        on_target = [n for n in nodes if n.ready and target_digest in (None, n.digest)]
        done = updated >= desired and ready >= desired and len(on_target) >= desired
        reason = f"{updated}/{desired} nodes updated, {ready}/{desired} ready"
    if done:
        return result(COMPLETE, f"all {desired} nodes ready on the new bundle")
    if elapsed >= timeout:
        failing = tuple(n.node for n in nodes
                        if not (n.ready and target_digest in (None, n.digest)))
        return result(FAILED, f"timed out after {timeout:g}s: {reason}", failing)
    return result(PROGRESSING, reason)
