"""Fleet rollouts through the desired state in Consul's KV store, with real processes: the
embedded registry, a bundle server, five `edgegen agent --follow` processes in two groups
(regions), the router, and steady load through the router for the whole time.

In order, on one fleet: int4 -> int8 wave by wave with no failed request; a rollout whose
canary fails a gate stops there and rolls back from the node's own disk (the rollback names
no URL: nothing can be downloaded); a node stopped during a rollout is deferred and catches
up when it is started again; an abort; the registry stopped during a wave (the rollout waits,
the agents serve on, and it completes once the registry is back). The timeline of each
rollout is printed (pytest -s)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time

import httpx
import pytest

from edge_agent.bundle import write_bundle
from manifests.consul_kv import ConsulKV
from manifests.errors import RolloutFailed
from manifests.fleet_rollout import FleetRollout, RolloutBusy, RolloutOptions
from tests.cloud_router.registry_support import start_registry
from tests.support.procs import REPO, EdgegenProcess, free_port, wait_http

pytestmark = [pytest.mark.smollm2, pytest.mark.timeout(1800)]

NODES = [("eu-1", "eu-west"), ("eu-2", "eu-west"), ("eu-3", "eu-west"),
         ("us-1", "us-east"), ("us-2", "us-east")]
MODEL = "smollm2"   # every version of the model under one name, as a user deploys them
QUESTION = {"messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 6,
            "temperature": 0}


class Fleet:
    def __init__(self, tmp, store, first):
        self.tmp = tmp
        self.registry_port = free_port()
        self.registry, self.consul = self.start_registry()
        port = free_port()
        self.server = EdgegenProcess(["bundle", "serve", str(store), "--port", str(port)],
                                     tmp, "bundle-server")
        self.bundles = f"http://127.0.0.1:{port}"
        wait_http(self.bundles + "/index.json", proc=self.server.proc)
        self.agents: dict[str, EdgegenProcess] = {}
        self.ports: dict[str, int] = {}
        for node, region in NODES:
            self.ports[node] = free_port()
            self.start(node, region, self.url(first))
        self.router_port = free_port()
        self.router = EdgegenProcess(["router", "--consul", self.consul, "--port",
                                      str(self.router_port)], tmp, "router")
        self.router_url = f"http://127.0.0.1:{self.router_port}"
        wait_http(self.router_url + "/readyz", timeout=120, proc=self.router.proc)
        self.wait_endpoints({n for n, _ in NODES})

    def start_registry(self):
        """The registry keeps its state in a data dir, as a Consul server does across a
        restart."""
        return start_registry(self.tmp, port=self.registry_port, data_dir=self.tmp / "consul",
                              name=f"registry-{int(time.time())}", min_deregister_after=0.0)

    def url(self, bundle) -> str:
        return f"{self.bundles}/{bundle.name}/{bundle.digest12}/"

    def start(self, node: str, region: str, bundle_url: str) -> None:
        port = self.ports[node]
        self.agents[node] = EdgegenProcess(
            ["agent", "--bundle", bundle_url, "--node", node, "--region", region, "--port",
             str(port), "--consul", self.consul, "--follow", "--store", str(self.tmp / node),
             "--advertise-host", "127.0.0.1", "--threads", "1", "--max-concurrency", "2"],
            self.tmp, f"agent-{node}-{int(time.time())}")
        wait_http(f"http://127.0.0.1:{port}/readyz", timeout=180, proc=self.agents[node].proc)

    def wait_endpoints(self, nodes: set[str], timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            rows = httpx.get(self.router_url + "/edgegen/v1/endpoints", timeout=10).json()
            if {r["node"] for r in rows["endpoints"] if r.get("healthy", True)} >= nodes:
                return
            time.sleep(0.5)
        raise TimeoutError(f"router never saw {nodes}")

    def serving(self, node: str) -> str:
        r = httpx.get(f"http://127.0.0.1:{self.ports[node]}/edgegen/v1/bundle", timeout=10)
        return r.json()["digest"][:12]

    def stop(self) -> None:
        for p in [self.router, *self.agents.values(), self.server, self.registry]:
            p.stop()
        for node, _ in NODES:   # several GB of bundle copies; the logs stay
            shutil.rmtree(self.tmp / node, ignore_errors=True)


class Load:
    """Steady requests through the router (what users see) and to each agent directly (so
    every node, the canary too, has traffic for its gates); failures are counted."""

    def __init__(self, fleet: Fleet):
        self.fleet = fleet
        self.ok = self.failed = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._through_router, daemon=True),
                         threading.Thread(target=self._to_each_agent, daemon=True)]

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(60)

    def _through_router(self) -> None:
        with httpx.Client(timeout=60) as client:
            while not self._stop.is_set():
                try:
                    r = client.post(self.fleet.router_url + "/v1/chat/completions",
                                    json={**QUESTION, "model": MODEL})
                    ok = r.status_code == 200 and r.json()["choices"][0]["message"]["content"]
                except httpx.HTTPError as exc:
                    ok, r = False, exc
                if ok:
                    self.ok += 1
                else:
                    self.failed += 1
                    self.failures.append(str(getattr(r, "text", r))[:200])
                time.sleep(0.05)

    def _to_each_agent(self) -> None:
        with httpx.Client(timeout=60) as client:
            while not self._stop.is_set():
                for node, port in self.fleet.ports.items():
                    try:
                        client.post(f"http://127.0.0.1:{port}/v1/chat/completions",
                                    json=QUESTION)
                    except httpx.HTTPError:
                        pass   # a stopped node; the router's load is what must not fail
                time.sleep(0.2)


def renamed(bundle, store):
    """``bundle`` sealed again under the name MODEL (a new digest, the same files)."""
    staging = store / ".staging" / bundle.digest12
    shutil.copytree(bundle.path, staging)
    for name in ("edgegen.json", "edgegen.sig"):
        (staging / name).unlink(missing_ok=True)
    manifest = {k: v for k, v in bundle.manifest.items()
                if k not in ("files", "format", "created", "edgegen_version")}
    return write_bundle(staging, {**manifest, "name": MODEL}, store)


@pytest.fixture(scope="module")
def bundles(smollm2_int4_bundle, smollm2_int8_bundle, smollm2_fp32_bundle, tmp_path_factory):
    store = tmp_path_factory.mktemp("rollout-bundles")
    yield {"int4": renamed(smollm2_int4_bundle, store),
           "int8": renamed(smollm2_int8_bundle, store),
           "fp32": renamed(smollm2_fp32_bundle, store)}
    shutil.rmtree(store, ignore_errors=True)


@pytest.fixture(scope="module")
def fleet(bundles, tmp_path_factory):
    f = Fleet(tmp_path_factory.mktemp("rollout-fleet"), bundles["int4"].path.parent.parent,
              bundles["int4"])
    yield f
    f.stop()


def timeline(view) -> str:
    lines = [f"rollout {view.id} -> {view.digest[:12]}: {view.state}"]
    for w in view.waves:
        lines.append(f"  {w['name']}: {', '.join(w['nodes'])}; pre-pull {w.get('prepull_s')} s, "
                     f"switch {w.get('switch_s')} s, bake {w.get('bake_s')} s; "
                     f"{w.get('state')}: {w.get('gates', '')}")
    return "\n".join(lines)


def rollout(fleet, bundle, **options) -> FleetRollout:
    opts = RolloutOptions(**{"waves": "1,50%,100%", "bake_s": 6.0, "poll_s": 0.3,
                             "min_requests": 1, "max_extensions": 2,
                             "gates": "error_rate<=0.02", **options})
    return FleetRollout(ConsulKV(fleet.consul), bundle.digest, fleet.url(bundle), opts)


def run_until_the_canary_switched(run: FleetRollout) -> tuple[threading.Thread, dict]:
    """``run.run()`` on a thread, returned once the canary has switched; the dict gets the
    rollout's ``view`` or the ``error`` it raised."""
    outcome: dict = {}

    def go():
        try:
            outcome["view"] = run.run()
        except BaseException as exc:   # noqa: BLE001 - handed to the test
            outcome["error"] = exc

    thread = threading.Thread(target=go, daemon=True)
    thread.start()
    deadline = time.monotonic() + 300
    while not run.view.waves or "switch_s" not in run.view.waves[0]:
        assert time.monotonic() < deadline and thread.is_alive(), "the canary never switched"
        time.sleep(0.3)
    return thread, outcome


def test_int4_to_int8_completes_wave_by_wave_with_no_failed_request(fleet, bundles):
    run = rollout(fleet, bundles["int8"])
    with Load(fleet) as load:
        view = run.run()
    print("\n" + timeline(view) + f"\n  requests through the router: {load.ok} ok, "
          f"{load.failed} failed")
    assert view.state == "complete"
    assert [len(w["nodes"]) for w in view.waves] == [1, 2, 2]
    assert all(w["state"] == "promoted" for w in view.waves)
    assert {fleet.serving(n) for n, _ in NODES} == {bundles["int8"].digest12}
    assert load.failed == 0, load.failures[:5]
    assert load.ok > 20


def test_a_second_rollout_is_refused_while_one_runs(fleet, bundles):
    kv = ConsulKV(fleet.consul)
    assert kv.put("edgegen/rollout/lock", b"someone-else", cas=0)
    try:
        with pytest.raises(RolloutBusy, match="someone-else"):
            rollout(fleet, bundles["int4"]).run()
    finally:
        kv.delete("edgegen/rollout/lock")


def test_a_canary_that_fails_its_gate_rolls_back_from_the_nodes_disk(fleet, bundles):
    run = rollout(fleet, bundles["fp32"], gates="error_rate<=0.02, ttft_p95<=0.001")
    with Load(fleet) as load:
        with pytest.raises(RolloutFailed, match="canary failed its gates.*ttft_p95"):
            run.run()
    print("\n" + timeline(run.view) + f"\n  requests through the router: {load.ok} ok, "
          f"{load.failed} failed")
    assert run.view.state == "rolled back"
    [canary] = run.view.waves[0]["nodes"]
    assert run.view.nodes[canary].state == "rolled back"
    # the rollback's desired state names no URL: the old bundle came from the node's disk
    raw = ConsulKV(fleet.consul).get(f"edgegen/nodes/{canary}/desired")
    assert json.loads(raw)["url"] == ""
    assert {fleet.serving(n) for n, _ in NODES} == {bundles["int8"].digest12}
    assert load.failed == 0, load.failures[:5]


def test_a_node_stopped_during_a_rollout_catches_up_when_started(fleet, bundles):
    fleet.agents["us-2"].stop()
    run = rollout(fleet, bundles["int4"])
    with Load(fleet) as load:
        view = run.run()
    print("\n" + timeline(view))
    assert view.state == "complete" and view.nodes["us-2"].state == "deferred"
    assert load.failed == 0, load.failures[:5]
    fleet.start("us-2", "us-east", fleet.url(bundles["int4"]))   # the seed it started with
    deadline = time.monotonic() + 120
    while fleet.serving("us-2") != bundles["int4"].digest12:
        assert time.monotonic() < deadline, "us-2 never caught up"
        time.sleep(0.5)


def test_abort_rolls_the_switched_nodes_back(fleet, bundles):
    run = rollout(fleet, bundles["int8"], bake_s=120.0)
    with Load(fleet) as load:
        thread, outcome = run_until_the_canary_switched(run)
        r = subprocess.run([sys.executable, "-m", "cli.main", "rollout", "abort", "--consul",
                            fleet.consul], cwd=REPO, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        thread.join(300)
    print("\n" + timeline(run.view))
    assert "aborted by the user" in str(outcome["error"])
    assert run.view.state == "rolled back"
    assert {fleet.serving(n) for n, _ in NODES} == {bundles["int4"].digest12}
    assert load.failed == 0, load.failures[:5]


def test_a_registry_that_goes_away_mid_rollout_pauses_it_while_agents_serve(fleet, bundles):
    run = rollout(fleet, bundles["int8"], bake_s=8.0)
    with Load(fleet) as load:
        thread, outcome = run_until_the_canary_switched(run)
        fleet.registry.stop()                      # during the canary's bake
        served = load.ok
        time.sleep(8.0)
        served_while_away = load.ok - served
        assert thread.is_alive()                   # waiting, not failed
        fleet.registry, _ = fleet.start_registry()
        thread.join(300)
    print("\n" + timeline(run.view) + f"\n  requests through the router: {load.ok} ok "
          f"({served_while_away} while the registry was away), {load.failed} failed")
    assert "error" not in outcome, outcome.get("error")
    assert outcome["view"].state == "complete"
    assert {fleet.serving(n) for n, _ in NODES} == {bundles["int8"].digest12}
    assert served_while_away > 0 and load.failed == 0, load.failures[:5]
