"""The fleet's desired state in Consul's KV store: what each node should serve, and what its
agent reports back. The contract between a rollout (``manifests.fleet_rollout``) and the
agents (``edge_agent.follower``); pure.

Keys, all under ``edgegen/``:

- ``edgegen/nodes/<node>/desired``  written by the rollout: ``{"digest", "url", "switch",
  "rollout"}``. The node fetches and verifies the bundle in the background while it keeps
  serving (pre-pull); it hot-swaps to it only when ``switch`` is true. A rollback is a
  desired state naming the node's last good bundle, which it still has on disk.
- ``edgegen/nodes/<node>/status``   written by the node's agent: ``{"serving", "last_good",
  "ready", "state", "progress", "error", "rollout", "at"}``; ``state`` is one of ``STATES``.
- ``edgegen/rollout/lock``          the running rollout's id, taken with ``cas=0`` (a second
  deploy is refused while it is there) and deleted when the rollout ends.
- ``edgegen/rollout/control``       ``pause``, ``resume`` or ``abort``, read by the running
  rollout between its steps.
- ``edgegen/rollout/state``         the running rollout's progress, for ``rollout status``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

PREFIX = "edgegen/"
LOCK_KEY = "edgegen/rollout/lock"
CONTROL_KEY = "edgegen/rollout/control"
STATE_KEY = "edgegen/rollout/state"
CONTROLS = ("pause", "resume", "abort")
# serving: the desired bundle (or no desired state); fetching: downloading it; ready: it is on
# disk, verified, waiting for its switch; failed: it cannot be fetched or loaded (the node
# keeps serving what it served)
STATES = ("serving", "fetching", "ready", "failed")


def desired_key(node: str) -> str:
    return f"{PREFIX}nodes/{node}/desired"


def status_key(node: str) -> str:
    return f"{PREFIX}nodes/{node}/status"


class DesiredStateError(ValueError):
    """A KV value that is not what the contract says."""


@dataclass(frozen=True)
class Desired:
    digest: str            # the bundle's full digest (sha256 of its manifest)
    url: str               # where to fetch it from (a bundle server)
    switch: bool = False   # serve it now (else: only have it ready)
    rollout: str = ""      # the rollout that wrote it

    def to_json(self) -> bytes:
        return json.dumps(asdict(self)).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> Desired:
        try:
            data = json.loads(raw)
            desired = cls(digest=str(data["digest"]), url=str(data["url"]),
                          switch=bool(data.get("switch", False)),
                          rollout=str(data.get("rollout", "")))
        except (ValueError, TypeError, KeyError) as exc:
            raise DesiredStateError(f"not a desired state: {exc}") from exc
        if len(desired.digest) < 12 or not all(c in "0123456789abcdef" for c in desired.digest):
            raise DesiredStateError(f"not a bundle digest: {desired.digest!r}")
        return desired


@dataclass(frozen=True)
class NodeStatus:
    serving: str                   # digest of the bundle being served
    state: str = "serving"
    last_good: str | None = None   # the bundle served before the last switch (on disk)
    ready: str | None = None       # a fetched, verified bundle waiting for its switch
    progress: float = 0.0          # of the fetch in progress, 0..1
    error: str | None = None
    rollout: str = ""              # the rollout whose desired state this answers
    at: float = 0.0                # when it was written (the agent's clock)

    def to_json(self) -> bytes:
        return json.dumps(asdict(self)).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> NodeStatus:
        try:
            data = json.loads(raw)
            return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})
        except (ValueError, TypeError) as exc:
            raise DesiredStateError(f"not a node status: {exc}") from exc
