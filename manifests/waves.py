"""The wave plan of a fleet rollout, pure: nodes + a wave spec -> the waves, in order.

A rollout moves nodes to a new bundle a wave at a time and promotes the next wave only when
the health gates (`manifests.gates`) pass on the nodes already moved. This module only says
which nodes go in which wave; it knows no clock, no cluster and no metrics, so tests feed it
tables.

The spec (``"1,10%,50%,100%"``) lists cumulative targets: after each wave at least that many
nodes (a count) or that share of the fleet (a percentage, rounded up) run the new bundle.

Choices, so that a plan is predictable:

- A spec whose last item is not ``100%`` gets a final ``100%`` step appended: a rollout that
  stops part-way is a state to recover from, never a plan (``"1"`` means canary, then all).
- A percentage step moves at least one node while nodes are left, so a small fleet still goes
  through as many observed stages as the spec asks (5 nodes, ``1,10%,50%,100%``: 1, 2, 3, 5).
  A count step is taken as written; one that moves nobody (``1,1``, or a count below an
  earlier percentage) makes an empty wave, and empty waves are dropped.
- Offline nodes stay in their wave (the runner defers them, it does not skip them), but the
  canary wave takes online nodes first: an offline canary would tell nothing.
- Names: the first wave is ``canary``, the last of several ``all``, those between
  ``wave 2``, ``wave 3``... (their position).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from itertools import zip_longest

DEFAULT_WAVES = "1,10%,50%,100%"


class PlanError(ValueError):
    """A wave spec or a group list cannot make a plan; the message names the bad part."""


@dataclass(frozen=True)
class FleetNode:
    name: str
    group: str = ""        # e.g. a site or a hardware class; waves spread over groups
    online: bool = True


@dataclass(frozen=True)
class Wave:
    name: str
    nodes: tuple[str, ...]


@dataclass(frozen=True)
class WaveStep:
    """One cumulative target of a spec: ``count`` nodes, or ``percent`` of the fleet."""

    text: str
    count: int | None = None
    percent: Fraction | None = None

    def target(self, fleet: int) -> int:
        """How many nodes should run the new bundle after this step (percentages round up)."""
        if self.count is not None:
            return min(self.count, fleet)
        return min(fleet, math.ceil(self.percent * fleet / 100))


def parse_wave_spec(spec: str) -> list[WaveStep]:
    """Read ``"1,10%,50%,100%"`` into steps; raise `PlanError` naming the first bad item.

    Counts must be whole and at least 1, percentages in (0, 100]; each kind must not decrease
    (a count and a percentage can only be compared once the fleet size is known).
    """
    items = [item.strip() for item in (spec or "").split(",")]
    if items == [""]:
        raise PlanError("empty wave spec: expected e.g. '1,10%,50%,100%'")
    steps: list[WaveStep] = []
    last: dict[str, WaveStep] = {}
    for pos, text in enumerate(items, 1):
        if not text:
            raise PlanError(f"wave spec {spec!r}: item {pos} is empty")
        step = _parse_step(text)
        kind = "count" if step.count is not None else "percent"
        before = last.get(kind)
        if before is not None and getattr(step, kind) < getattr(before, kind):
            raise PlanError(f"wave spec {spec!r}: {text!r} comes after {before.text!r}; "
                            "targets are cumulative and must not decrease")
        last[kind] = step
        steps.append(step)
    if steps[-1].percent != 100:
        steps.append(WaveStep("100%", percent=Fraction(100)))
    return steps


def _parse_step(text: str) -> WaveStep:
    if text.endswith("%"):
        try:
            pct = Fraction(text[:-1].strip())
        except (ValueError, ZeroDivisionError):
            raise PlanError(f"wave {text!r} is not a percentage like '10%'") from None
        if not 0 < pct <= 100:
            raise PlanError(f"wave {text!r}: a percentage must be above 0% and at most 100%")
        return WaveStep(text, percent=pct)
    if not text.lstrip("+-").isdigit():
        raise PlanError(f"wave {text!r} is neither a whole node count like '3' nor a "
                        "percentage like '10%'")
    count = int(text)
    if count < 1:
        raise PlanError(f"wave {text!r}: a node count must be at least 1")
    return WaveStep(text, count=count)


def plan_waves(nodes: list[FleetNode], spec: str = DEFAULT_WAVES, *,
               groups: list[str] | None = None) -> list[Wave]:
    """The waves of a rollout over ``nodes``, canary first; every rolled-out node in one wave.

    With ``groups``, only nodes of those groups take part and waves go group by group in that
    order (the canary is the first node of the first group). Without, nodes are ordered by
    (group, name) and dealt round-robin over groups, so that every wave spreads over the
    groups as evenly as it can: a bad bundle shows on each kind of node early. An empty
    ``groups`` list means no filter.
    """
    steps = parse_wave_spec(spec)
    order = _order(nodes, groups)
    if not order:
        raise PlanError("no nodes to roll out to: the fleet is empty")
    fleet = len(order)
    cuts, done = [], 0
    for step in steps:
        target = step.target(fleet)
        if step.percent is not None and done < fleet:
            target = max(target, done + 1)
        if target > done:
            cuts.append(target)
            done = target
    order = _online_first(order, cuts[0])
    waves, start = [], 0
    for i, end in enumerate(cuts):
        name = "canary" if i == 0 else "all" if i == len(cuts) - 1 else f"wave {i + 1}"
        waves.append(Wave(name, tuple(n.name for n in order[start:end])))
        start = end
    return waves


def _order(nodes: list[FleetNode], groups: list[str] | None) -> list[FleetNode]:
    seen: set[str] = set()
    for n in nodes:
        if n.name in seen:
            raise PlanError(f"node {n.name!r} is listed twice")
        seen.add(n.name)
    by_group: dict[str, list[FleetNode]] = {}
    for n in sorted(nodes, key=lambda n: (n.group, n.name)):
        by_group.setdefault(n.group, []).append(n)
    if groups:
        unknown = [g for g in groups if g not in by_group]
        if unknown:
            known = ", ".join(repr(g) for g in by_group) or "none"
            raise PlanError(f"unknown group {unknown[0]!r}; the fleet's groups are: {known}")
        return [n for g in dict.fromkeys(groups) for n in by_group[g]]
    dealt = zip_longest(*by_group.values())
    return [n for row in dealt for n in row if n is not None]


def _online_first(order: list[FleetNode], canary_size: int) -> list[FleetNode]:
    """Fill the canary wave with online nodes first; the rest keep their order."""
    online = [n for n in order if n.online]
    canary = (online + [n for n in order if not n.online])[:canary_size]
    return canary + [n for n in order if n not in canary]
