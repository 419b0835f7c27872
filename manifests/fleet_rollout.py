"""A fleet rollout through the desired state in Consul's KV store (``edge_agent.desired``):
pre-pull everywhere, then switch wave by wave, promoting a wave only when its health gates
pass against the nodes still on the old bundle; on a failed gate, a node that cannot switch,
or an abort, every switched node goes back to its last good bundle from its own disk.

``manifests.waves`` plans the waves and ``manifests.gates`` judges them (pure); this module is
the loop between them and the fleet: Consul (``manifests.consul_kv``) and the agents'
figures (``manifests.fleet_metrics``: their ``/metrics``, or Prometheus). Nothing
restarts: agents fetch in the background and hot-swap.

- One rollout at a time: ``edgegen/rollout/lock`` is taken with ``cas=0``; a second deploy is
  refused naming the running one.
- Offline nodes are deferred, not failed: their desired state waits for them, and they
  converge when they come back; the status lists them.
- A registry that goes away pauses the rollout until it answers again; agents serve on.
- ``edgegen/rollout/control`` (``pause``, ``resume``, ``abort``) is read between steps.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from edge_agent.desired import (
    CONTROL_KEY,
    LOCK_KEY,
    STATE_KEY,
    Desired,
    DesiredStateError,
    NodeStatus,
    desired_key,
    status_key,
)
from manifests.consul_kv import Agent, ConsulKV, RegistryUnreachable
from manifests.errors import DeployError, RolloutFailed
from manifests.fleet_metrics import MetricsSource, ScrapeMetrics
from manifests.gates import (
    DEFAULT_GATES,
    GateError,
    combine,
    decide,
    parse_gates,
    window,
)
from manifests.waves import (
    DEFAULT_WAVES,
    FleetNode,
    PlanError,
    parse_wave_spec,
    plan_waves,
)

log = logging.getLogger(__name__)


class RolloutBusy(DeployError):
    """Another rollout holds the lock."""


@dataclass(frozen=True)
class RolloutOptions:
    waves: str = DEFAULT_WAVES
    groups: tuple[str, ...] | None = None   # only these groups (regions), in this order
    bake_s: float = 60.0                    # how long each wave's health is watched
    gates: str = DEFAULT_GATES
    min_requests: int = 5                   # fewer in a bake: extend it (up to max_extensions)
    max_extensions: int = 2
    # A wave still unjudged after its extensions (too little traffic): "pause" waits for
    # `rollout resume` (promote) or `abort` (roll back), as Argo Rollouts does with an
    # inconclusive analysis; "promote" goes on; "fail" rolls back.
    inconclusive: str = "pause"
    prepull_timeout: float = 1800.0
    switch_timeout: float = 180.0
    poll_s: float = 0.5


@dataclass
class NodeRow:
    node: str
    group: str
    wave: str = ""
    state: str = "waiting"        # waiting | pre-pulled | switched | rolled back | deferred | failed
    digest: str = ""
    detail: str = ""


@dataclass
class RolloutView:
    """What ``rollout status`` and the live table show."""

    id: str
    digest: str
    state: str = "pre-pulling"    # pre-pulling | <wave> | complete | failed | rolled back
    nodes: dict[str, NodeRow] = field(default_factory=dict)
    waves: list[dict] = field(default_factory=list)   # name, nodes, state, gates, timings

    def to_dict(self) -> dict:
        return {"id": self.id, "digest": self.digest, "state": self.state,
                "nodes": [vars(r) for r in self.nodes.values()], "waves": self.waves}

    def to_json(self) -> bytes:
        return json.dumps(self.to_dict()).encode()


INCONCLUSIVE = ("pause", "promote", "fail")


class FleetRollout:
    def __init__(self, kv: ConsulKV, digest: str, url: str, options: RolloutOptions,
                 progress: Callable[[RolloutView], None] = lambda view: None,
                 sleep: Callable[[float], None] = time.sleep,
                 metrics: MetricsSource | None = None):
        self.kv, self.digest, self.url, self.opt = kv, digest, url, options
        try:   # bad input fails before anything is written
            self.gates = parse_gates(options.gates)
            parse_wave_spec(options.waves)
        except (GateError, PlanError) as exc:
            raise DeployError(str(exc)) from exc
        if options.inconclusive not in INCONCLUSIVE:
            raise DeployError(f"--inconclusive must be one of {', '.join(INCONCLUSIVE)}, not "
                              f"{options.inconclusive!r}")
        self.metrics = metrics or ScrapeMetrics()
        self.progress = progress
        self.sleep = sleep
        self.view = RolloutView(id=uuid.uuid4().hex[:12], digest=digest)
        self.agents: dict[str, Agent] = {}
        self.switched: dict[str, str] = {}        # node -> the digest it served before

    # -- the run ----------------------------------------------------------------------------

    def run(self) -> RolloutView:
        if not self._retry(lambda: self.kv.put(LOCK_KEY, self.view.id.encode(), cas=0)):
            holder = self._retry(lambda: self.kv.get(LOCK_KEY)) or b"?"
            raise RolloutBusy(f"another rollout ({holder.decode(errors='replace')}) is running; "
                              "wait for it, or end it with `edgegen rollout abort`")
        try:
            self._retry(lambda: self.kv.delete(CONTROL_KEY))
            waves = self._plan()
            self._prepull()
            for wave in waves:
                self._wave(wave.name, list(wave.nodes))
            self.view.state = "complete"
            self._show()
            return self.view
        except RolloutFailed as exc:
            self._rollback(str(exc))
            raise
        finally:
            self._retry(lambda: self.kv.delete(LOCK_KEY))

    def _plan(self):
        agents = self._retry(self.kv.edge_agents)
        self.agents = {a.node: a for a in agents}
        known = set(self.agents)
        for key in self._retry(lambda: self.kv.get_prefix("edgegen/nodes/")):
            known.add(key.split("/")[2])       # nodes that reported once, offline now
        nodes = [FleetNode(n, self.agents[n].group if n in self.agents else "",
                           online=n in self.agents and self.agents[n].healthy)
                 for n in sorted(known)]
        try:
            waves = plan_waves(nodes, self.opt.waves,
                               groups=list(self.opt.groups) if self.opt.groups else None)
        except PlanError as exc:
            raise DeployError(f"cannot plan the rollout: {exc}") from exc
        for fn in nodes:
            if any(fn.name in w.nodes for w in waves):
                self.view.nodes[fn.name] = NodeRow(fn.name, fn.group)
        for w in waves:
            self.view.waves.append({"name": w.name, "nodes": list(w.nodes), "state": "waiting"})
            for n in w.nodes:
                self.view.nodes[n].wave = w.name
        self._show()
        return waves

    def _prepull(self) -> None:
        """Every node fetches the bundle while it serves the old one; a node that cannot
        (verification, disk) fails the rollout before anything switched."""
        started = time.monotonic()
        for node in self.view.nodes:
            self._write_desired(node, self.digest, switch=False)
        pending = set(self._online(self.view.nodes))
        while pending:
            self._control()
            for node in sorted(pending):
                status = self._status(node)
                row = self.view.nodes[node]
                if status is None or status.rollout != self.view.id:
                    continue
                if status.state == "failed":
                    row.state, row.detail = "failed", status.error or ""
                    raise RolloutFailed(f"{node} cannot pre-pull the bundle: {status.error}")
                if self.digest in (status.ready, status.serving):
                    row.state, row.detail = "pre-pulled", ""
                    pending.discard(node)
                elif status.state == "fetching":
                    row.detail = f"fetching {status.progress:.0%}"
            self._online(self.view.nodes)   # marks the nodes that went offline deferred
            self._show()
            if time.monotonic() - started > self.opt.prepull_timeout:
                raise RolloutFailed(f"pre-pull not done in {self.opt.prepull_timeout:.0f} s: "
                                    f"{', '.join(sorted(pending))}")
            if pending:
                self.sleep(self.opt.poll_s)
        for w in self.view.waves:
            w["prepull_s"] = round(time.monotonic() - started, 1)

    def _wave(self, name: str, nodes: list[str]) -> None:
        record = next(w for w in self.view.waves if w["name"] == name)
        self.view.state = record["state"] = name
        self._control()
        started = time.monotonic()
        baseline = [n for n in self._online(self.view.nodes)
                    if n not in self.switched and n not in nodes]
        for node in nodes:
            before = self._status(node)
            agent = self.agents.get(node)
            self.switched[node] = (before.serving if before else "") or \
                (agent.digest12 if agent else "")
            self._write_desired(node, self.digest, switch=True)
        online = self._online(nodes)
        self._await_switch(online, started)
        record["switch_s"] = round(time.monotonic() - started, 1)
        decision = self._bake(online, baseline, record)
        record["gates"] = decision.summary()
        if decision.state == "pending":
            self._inconclusive(name, record, decision.summary())
        elif decision.state == "fail":
            record["state"] = "failed"
            self._show()
            raise RolloutFailed(f"wave {name} failed its gates on "
                                f"{', '.join(online)}: {decision.summary()}")
        record["state"] = "promoted"
        self._show()

    def _inconclusive(self, name: str, record: dict, summary: str) -> None:
        """A wave the gates could not judge: never promoted silently unless asked to."""
        record["state"] = "inconclusive"
        if self.opt.inconclusive == "fail":
            self._show()
            raise RolloutFailed(f"wave {name} could not be judged: {summary}")
        if self.opt.inconclusive == "pause":
            log.warning("wave could not be judged; the rollout pauses",
                        extra={"wave": name, "gates": summary})
            record["gates"] = (f"{summary} -- paused: `edgegen rollout resume` promotes it, "
                               "`edgegen rollout abort` rolls back")
            self._retry(lambda: self.kv.put(CONTROL_KEY, b"pause"))
            self._control()

    def _await_switch(self, nodes: list[str], started: float) -> None:
        pending = set(nodes)
        while pending:
            self._control()
            for node in sorted(pending):
                status = self._status(node)
                row = self.view.nodes[node]
                if status is None:
                    continue
                if status.state == "failed" and status.rollout == self.view.id:
                    row.state, row.detail = "failed", status.error or ""
                    raise RolloutFailed(f"{node} cannot switch to the bundle: {status.error}")
                if status.serving.startswith(self.digest):
                    row.state, row.digest, row.detail = "switched", status.serving[:12], ""
                    pending.discard(node)
            self._show()
            if time.monotonic() - started > self.opt.switch_timeout:
                raise RolloutFailed(f"{', '.join(sorted(pending))} did not switch within "
                                    f"{self.opt.switch_timeout:.0f} s")
            if pending:
                self.sleep(self.opt.poll_s)

    def _bake(self, nodes: list[str], baseline: list[str], record: dict):
        """Watch the wave's nodes and the baseline for bake_s (longer while too few requests
        came in); the gate decision on the window."""
        decision = None
        for _ in range(1 + self.opt.max_extensions):
            before = {n: self._scrape(n) for n in nodes + baseline}
            t0 = time.monotonic()
            end = t0 + self.opt.bake_s
            while time.monotonic() < end:
                self._control()
                for node in nodes:
                    if not self._serving_new(node):
                        raise RolloutFailed(f"{node} left the new bundle during the bake "
                                            "(crashed or restarted)")
                self.sleep(min(self.opt.poll_s * 2, max(0.0, end - time.monotonic())))
            seconds = time.monotonic() - t0
            after = {n: self._scrape(n) for n in nodes + baseline}
            figures = {n: window(before[n], after[n], seconds) for n in before
                       if before[n] is not None and after[n] is not None}
            canary = combine([figures[n] for n in nodes if n in figures])
            base = [figures[n] for n in baseline if n in figures]
            decision = decide(self.gates, canary, combine(base) if base else None,
                              min_requests=self.opt.min_requests)
            record["bake_s"] = round(record.get("bake_s", 0) + seconds, 1)
            record["figures"] = decision.figures
            if decision.state != "pending":
                return decision
        return decision

    # -- rollback ---------------------------------------------------------------------------

    def _rollback(self, reason: str) -> None:
        """Every switched node back to the bundle it served before, from its own disk."""
        self.view.state = "rolling back"
        for wave in self.view.waves:   # a failed wave stays "failed": it names the cause
            if wave["state"] not in ("waiting", "failed"):
                wave["state"] = "rolled back"
        log.warning("rollout failed; rolling back", extra={"reason": reason})
        for node, old in self.switched.items():
            if old:
                self._write_desired(node, old, switch=True, url="")
        for node in set(self.view.nodes) - set(self.switched):
            status = self._status(node)   # pre-pulled only: keep serving what it serves
            if status is not None and status.serving:
                self._write_desired(node, status.serving, switch=True, url="")
        deadline = time.monotonic() + self.opt.switch_timeout
        pending = {n for n in self._online(list(self.switched)) if self.switched[n]}
        while pending and time.monotonic() < deadline:
            for node in sorted(pending):
                status = self._status(node)
                if status is not None and status.serving.startswith(self.switched[node]):
                    row = self.view.nodes[node]
                    row.state, row.digest = "rolled back", status.serving[:12]
                    pending.discard(node)
            self._show()
            if pending:
                self.sleep(self.opt.poll_s)
        self.view.state = "rolled back" if not pending else "failed"
        self._show()

    # -- plumbing ---------------------------------------------------------------------------

    def _write_desired(self, node: str, digest: str, *, switch: bool, url: str | None = None):
        desired = Desired(digest=digest, url=self.url if url is None else url, switch=switch,
                          rollout=self.view.id)
        self._retry(lambda: self.kv.put(desired_key(node), desired.to_json()))

    def _status(self, node: str) -> NodeStatus | None:
        raw = self._retry(lambda: self.kv.get(status_key(node)))
        try:
            return NodeStatus.from_json(raw) if raw else None
        except DesiredStateError:
            return None

    def _online(self, nodes) -> list[str]:
        """Of ``nodes``, those the catalog lists as healthy now."""
        agents = {a.node: a for a in self._retry(self.kv.edge_agents)}
        self.agents.update(agents)
        up = [n for n in nodes if n in agents and agents[n].healthy]
        for n in nodes:
            row = self.view.nodes.get(n)
            if row is not None and n not in up and row.state not in ("failed",):
                row.state, row.detail = "deferred", "offline: converges when it is back"
        return up

    def _serving_new(self, node: str) -> bool:
        status = self._status(node)
        return status is None or status.serving.startswith(self.digest)

    def _scrape(self, node: str):
        """The node's counters now; None (no figures for this window) when unreadable."""
        agent = self.agents.get(node)
        return self.metrics.snapshot(agent) if agent else None

    def _control(self) -> None:
        """Honour pause/resume/abort written to the control key."""
        running = self.view.state
        while True:
            raw = self._retry(lambda: self.kv.get(CONTROL_KEY))
            command = (raw or b"").decode(errors="replace").strip()
            if command == "abort":
                raise RolloutFailed("aborted by the user")
            if command != "pause":
                if self.view.state != running:
                    self.view.state = running
                    self._show()
                return
            if self.view.state == running:
                self.view.state = f"paused ({running})"
                self._show()
            self.sleep(self.opt.poll_s * 2)

    def _retry(self, call):
        """``call()``, waiting out a registry that does not answer (the rollout pauses)."""
        delay = self.opt.poll_s
        while True:
            try:
                return call()
            except RegistryUnreachable as exc:
                log.warning("registry unreachable; the rollout waits", extra={"error": str(exc)})
                self.sleep(delay)
                delay = min(10.0, delay * 2)

    def _show(self) -> None:
        self.progress(self.view)
        try:
            self.kv.put(STATE_KEY, self.view.to_json())
        except (RegistryUnreachable, DeployError):
            pass
