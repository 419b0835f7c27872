"""A wave the gates cannot judge (too little traffic over its bake and extensions) is never
promoted silently: by default the rollout pauses for `rollout resume` or `abort`, as Argo
Rollouts does with an inconclusive analysis. A real registry, agents from fake_nodes."""

from __future__ import annotations

import json
import threading
import time

import pytest

from edge_agent.desired import CONTROL_KEY, STATE_KEY
from manifests.consul_kv import ConsulKV
from manifests.errors import DeployError, RolloutFailed
from manifests.fleet_rollout import FleetRollout, RolloutOptions
from tests.cloud_router.registry_support import start_registry
from tests.support.fake_nodes import FakeNode

A, B = "a" * 64, "b" * 64


@pytest.fixture()
def quiet_fleet(tmp_path):
    """Two nodes serving A that answer no requests at all."""
    proc, url = start_registry(tmp_path)
    nodes = [FakeNode(url, f"n{i}", "eu", A, rate=0).start() for i in (1, 2)]
    yield url, nodes
    for n in nodes:
        n.stop()
    proc.stop()


def options(inconclusive: str) -> RolloutOptions:
    return RolloutOptions(waves="1,100%", bake_s=0.3, max_extensions=1, poll_s=0.1,
                          inconclusive=inconclusive)


def wait_state(kv: ConsulKV, state: str, timeout: float = 20.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        raw = kv.get(STATE_KEY)
        view = json.loads(raw) if raw else {}
        if view.get("state") == state:
            return view
        time.sleep(0.05)
    raise AssertionError(f"the rollout never reached {state!r}; last: {view.get('state')}")


def test_an_unjudged_wave_pauses_until_the_user_resumes(quiet_fleet):
    url, nodes = quiet_fleet
    kv = ConsulKV(url)
    result = {}
    run = FleetRollout(kv, B, "http://bundles.example/b", options("pause"))
    thread = threading.Thread(target=lambda: result.update(view=run.run()))
    thread.start()
    view = wait_state(kv, "paused (canary)")
    canary = view["waves"][0]
    assert canary["state"] == "inconclusive" and "rollout resume" in canary["gates"]
    assert "0 requests" in canary["gates"]
    time.sleep(0.5)    # paused: the next wave waits
    assert [n.serving for n in nodes].count(B) == 1
    kv.put(CONTROL_KEY, b"resume")
    wait_state(kv, "paused (all)")
    kv.put(CONTROL_KEY, b"resume")
    thread.join(20)
    assert result["view"].state == "complete"
    assert [n.serving for n in nodes] == [B, B]


def test_an_unjudged_wave_is_rolled_back_when_the_user_aborts(quiet_fleet):
    url, nodes = quiet_fleet
    kv = ConsulKV(url)
    errors = []

    def run():
        try:
            FleetRollout(kv, B, "http://bundles.example/b", options("pause")).run()
        except RolloutFailed as exc:
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    wait_state(kv, "paused (canary)")
    kv.put(CONTROL_KEY, b"abort")
    thread.join(20)
    assert errors and "aborted by the user" in str(errors[0])
    assert [n.serving for n in nodes] == [A, A]
    view = json.loads(kv.get(STATE_KEY))
    assert view["state"] == "rolled back"
    assert [w["state"] for w in view["waves"]] == ["rolled back", "waiting"]


def test_fail_rolls_an_unjudged_wave_back_and_promote_goes_on(quiet_fleet):
    url, nodes = quiet_fleet
    kv = ConsulKV(url)
    with pytest.raises(RolloutFailed, match="wave canary could not be judged: pending"):
        FleetRollout(kv, B, "http://bundles.example/b", options("fail")).run()
    assert [n.serving for n in nodes] == [A, A]
    view = FleetRollout(kv, B, "http://bundles.example/b", options("promote")).run()
    assert view.state == "complete" and [w["state"] for w in view.waves] == ["promoted"] * 2
    assert [n.serving for n in nodes] == [B, B]


def test_an_unknown_choice_is_refused_before_anything_is_written(quiet_fleet):
    url, _ = quiet_fleet
    kv = ConsulKV(url)
    with pytest.raises(DeployError, match="--inconclusive must be one of pause, promote, fail"):
        FleetRollout(kv, B, "http://bundles.example/b", options("maybe"))
    assert kv.get_prefix("edgegen/nodes/n1/desired") == {}
