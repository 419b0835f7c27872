"""The rollout decision on plain DaemonSet and pod status objects."""

import pytest

from manifests.rollout import COMPLETE, FAILED, PROGRESSING, decide, node_state

NEW, OLD = "n" * 64, "o" * 64


def ds(generation=2, observed=2, desired=3, updated=3, ready=3):
    return {"metadata": {"generation": generation},
            "status": {"observedGeneration": observed, "desiredNumberScheduled": desired,
                       "updatedNumberScheduled": updated, "numberReady": ready}}


def pod(node, digest=NEW, ready=True, waiting=None, restarts=0, init_done=True):
    return {
        "metadata": {"name": f"edge-{node}", "annotations": {"edgegen.io/bundle-digest": digest}},
        "spec": {"nodeName": node},
        "status": {
            "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
            "initContainerStatuses": [{"name": "bundle-pull", "restartCount": 0, "state":
                                       {"terminated": {"exitCode": 0}} if init_done
                                       else {"running": {}}}],
            "containerStatuses": [{"name": "agent", "restartCount": restarts,
                                   "state": {"waiting": {"reason": waiting}} if waiting
                                   else {"running": {}}}],
        },
    }


CASES = [
    # name, daemonset, pods, elapsed, expected state, expected failing nodes
    ("all ready", ds(), [pod("a"), pod("b"), pod("c")], 5, COMPLETE, ()),
    ("generation not observed", ds(observed=1), [pod("a"), pod("b"), pod("c")], 5,
     PROGRESSING, ()),
    ("one node still old", ds(updated=2, ready=3), [pod("a"), pod("b"), pod("c", OLD)], 5,
     PROGRESSING, ()),
    ("counts say done but a pod is old", ds(), [pod("a"), pod("b"), pod("c", OLD)], 5,
     PROGRESSING, ()),
    ("pulling bundle", ds(ready=2), [pod("a"), pod("b"), pod("c", ready=False,
                                                           init_done=False)], 5, PROGRESSING, ()),
    ("crash loop fails at once", ds(ready=2),
     [pod("a"), pod("b"), pod("c", ready=False, waiting="CrashLoopBackOff", restarts=3)], 5,
     FAILED, ("c",)),
    ("first crash is given a chance", ds(ready=2),
     [pod("a"), pod("b"), pod("c", ready=False, waiting="CrashLoopBackOff", restarts=1)], 5,
     PROGRESSING, ()),
    ("image pull error", ds(ready=2),
     [pod("a"), pod("b"), pod("c", ready=False, waiting="ImagePullBackOff")], 5, FAILED, ("c",)),
    ("timeout names unready nodes", ds(ready=1),
     [pod("a"), pod("b", ready=False), pod("c", OLD)], 601, FAILED, ("b", "c")),
    ("no nodes yet", ds(desired=0, updated=0, ready=0), [], 5, PROGRESSING, ()),
    ("no nodes at timeout", ds(desired=0, updated=0, ready=0), [], 601, FAILED, ()),
]


@pytest.mark.parametrize("name, daemonset, pods, elapsed, state, failing", CASES,
                         ids=[c[0] for c in CASES])
def test_decide(name, daemonset, pods, elapsed, state, failing):
    d = decide(daemonset, pods, NEW, elapsed, timeout=600)
    assert d.state == state, d.reason
    assert d.failing_nodes == failing


def test_node_rows_say_what_each_node_does():
    rows = {n.node: n for n in decide(ds(ready=1), [
        pod("a"), pod("b", ready=False, init_done=False), pod("c", OLD),
        pod("d", ready=False, waiting="CrashLoopBackOff", restarts=4)], NEW, 1, 600).nodes}
    assert rows["a"].phase == "ready"
    assert rows["b"].phase == "pulling bundle"
    assert rows["c"].phase == "old bundle"
    assert rows["d"].phase == "crash-looping" and "4 restarts" in rows["d"].detail


def test_init_container_crash_is_named_as_bundle_pull():
    p = pod("a", ready=False)
    p["status"]["initContainerStatuses"][0].update(
        restartCount=5, state={"waiting": {"reason": "CrashLoopBackOff"}})
    assert "bundle pull" in node_state(p, NEW, 2).detail
