"""The agent's desired-state follower (``edge_agent.follower``) against an in-memory KV store
with Consul's blocking semantics and a host that records swaps: pre-pull, switch, rollback
from disk, refusals, an unreachable registry, and the bundle remembered across restarts. The
same against real processes: tests/e2e/test_fleet_rollout.py."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from types import SimpleNamespace

import pytest

from edge_agent.desired import Desired, DesiredStateError, NodeStatus, desired_key, status_key
from edge_agent.errors import RegistrationError
from edge_agent.follower import DesiredStateFollower, remembered
from edge_agent.serving.protocol import error
from edge_agent.settings import AgentSettings
from tests.support.fake_engine import write_fake_bundle

pytestmark = pytest.mark.timeout(30)


class MemoryKV:
    """Consul's KV semantics the follower relies on: an index that grows with every write,
    and a blocking read that returns when the key changes past the index given (or, as
    Consul's, with the same index when its wait is over)."""

    def __init__(self):
        self.values: dict[str, bytes] = {}
        self.index = 1
        self.changed = asyncio.Event()
        self.down = False
        self.closed = False

    async def get(self, key, index=None):
        if self.down:
            raise RegistrationError("consul at test: connection refused")
        if index is not None and self.index <= index:
            try:
                await asyncio.wait_for(self.changed.wait(), 1)
            except TimeoutError:
                pass
        return self.index, self.values.get(key)

    async def close(self):
        self.closed = True

    async def put(self, key, value):
        if self.down:
            raise RegistrationError("consul at test: connection refused")
        self.values[key] = value
        self.index += 1
        self.changed.set()
        self.changed = asyncio.Event()
        return True


class Host:
    def __init__(self, bundle, refuse: bool = False):
        self.model = SimpleNamespace(bundle=bundle)
        self.trust = None
        self.refuse = refuse
        self.swaps: list[str] = []

    async def swap(self, path):
        self.swaps.append(path)
        if self.refuse:
            return error(400, "bundle refused: the model cannot load")
        from edge_agent.bundle import open_bundle
        self.model = SimpleNamespace(bundle=open_bundle(path))
        return self.model.bundle


@pytest.fixture()
def store(tmp_path, bpe_tokenizer_dir):
    old = write_fake_bundle(bpe_tokenizer_dir, tmp_path, name="model-a")
    new = write_fake_bundle(bpe_tokenizer_dir, tmp_path, name="model-b")
    return tmp_path, old, new


def status(kv) -> NodeStatus:
    return NodeStatus.from_json(kv.values[status_key("n1")])


async def until(predicate, timeout=5.0):
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition never held"
        await asyncio.sleep(0.01)


def run(scenario, store, refuse=False):
    root, old, new = store
    settings = AgentSettings(bundle=str(old.path), node="n1", store=root, consul="x", follow=True)
    kv, host, swapped = MemoryKV(), Host(old, refuse), []

    async def go():
        async def on_swap(bundle):
            swapped.append(bundle.digest)
        follower = DesiredStateFollower(settings, host, kv, on_swap, max_backoff=0.05)
        await follower.start()
        try:
            await scenario(kv, host, old, new, swapped)
        finally:
            await follower.stop()
        assert kv.closed   # its blocking reads end with the agent
    asyncio.run(go())
    return settings


def test_pre_pull_then_switch_keeps_the_old_bundle_as_last_good(store):
    async def scenario(kv, host, old, new, swapped):
        await until(lambda: status_key("n1") in kv.values)
        assert status(kv).serving == old.digest and status(kv).state == "serving"
        await kv.put(desired_key("n1"), Desired(new.digest, "", switch=False, rollout="r1")
                     .to_json())
        await until(lambda: status(kv).state == "ready")
        assert status(kv).ready == new.digest and host.swaps == []   # fetched, still old
        await kv.put(desired_key("n1"), Desired(new.digest, "", switch=True, rollout="r1")
                     .to_json())
        await until(lambda: status(kv).serving == new.digest)
        s = status(kv)
        assert (s.last_good, s.state, s.rollout) == (old.digest, "serving", "r1")
        assert swapped == [new.digest]
        # rollback: the old bundle from disk (no URL to fetch from)
        await kv.put(desired_key("n1"), Desired(old.digest, "", switch=True, rollout="r1")
                     .to_json())
        await until(lambda: status(kv).serving == old.digest)
    settings = run(scenario, store)
    assert remembered(settings, None).digest == store[1].digest
    # a new seed (a redeploy with another --bundle) wins over what was served
    assert remembered(dataclasses.replace(settings, bundle="/elsewhere"), None) is None


def test_a_bundle_that_cannot_be_had_is_reported_and_the_node_serves_on(store):
    async def scenario(kv, host, old, new, swapped):
        await kv.put(desired_key("n1"), Desired("ab" * 32, "http://127.0.0.1:9/x/abababababab/",
                                                switch=True, rollout="r2").to_json())
        await until(lambda: status_key("n1") in kv.values and status(kv).state == "failed")
        assert "127.0.0.1:9" in status(kv).error and host.swaps == []
        assert status(kv).serving == old.digest
    run(scenario, store)


def test_a_bundle_that_does_not_load_is_reported_and_the_old_one_serves(store):
    async def scenario(kv, host, old, new, swapped):
        await kv.put(desired_key("n1"), Desired(new.digest, "", switch=True).to_json())
        await until(lambda: status_key("n1") in kv.values and status(kv).state == "failed")
        assert "cannot load" in status(kv).error and swapped == []
    run(scenario, store, refuse=True)


def test_an_unreachable_registry_is_retried_while_the_node_serves(store):
    async def scenario(kv, host, old, new, swapped):
        kv.down = True
        await asyncio.sleep(0.3)
        kv.down = False
        await kv.put(desired_key("n1"), Desired(new.digest, "", switch=True).to_json())
        await until(lambda: status_key("n1") in kv.values and status(kv).serving == new.digest)
    run(scenario, store)


@pytest.mark.parametrize("raw", [b"not json", b"{}", json.dumps({"digest": "xyz", "url": ""})
                                 .encode()])
def test_a_malformed_desired_state_is_refused(raw):
    with pytest.raises(DesiredStateError):
        Desired.from_json(raw)
