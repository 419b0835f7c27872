"""The fleet: every endpoint the router knows now, and what follows from that set alone.

An immutable snapshot. The table builds a new one when discovery reports a change, as Envoy
recomputes what it derives from a host set when the set changes, not per request; per-request
code reads the current one and never merges sources itself. Pure: no I/O, no clock.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Iterable, Mapping

from cloud_router.endpoints import Endpoint


@dataclass(frozen=True)
class Fleet:
    endpoints: tuple[Endpoint, ...]
    by_id: Mapping[str, Endpoint]
    # model -> the endpoints serving it: the policy's candidates for a request
    serving: Mapping[str, tuple[Endpoint, ...]]
    # tier -> endpoint ids: the share of a tier that ejections may take is counted on these
    tier_ids: Mapping[str, tuple[str, ...]]
    models: tuple[str, ...]          # served now, sorted
    known_models: frozenset[str]     # served now or by an earlier fleet

    @classmethod
    def of(cls, endpoints: Iterable[Endpoint],
           known_models: Iterable[str] = frozenset()) -> Fleet:
        """The fleet of ``endpoints`` (a later one with the same id replaces an earlier one);
        ``known_models`` carries the models of earlier fleets forward, so that a model whose
        endpoints all went away is unavailable (503), not unknown (404)."""
        by_id: dict[str, Endpoint] = {}
        for e in endpoints:
            by_id[e.id] = e
        serving: dict[str, list[Endpoint]] = {}
        tier_ids: dict[str, list[str]] = {}
        for e in by_id.values():
            serving.setdefault(e.model, []).append(e)
            tier_ids.setdefault(e.tier, []).append(e.id)
        models = tuple(sorted(m for m in serving if m))
        return cls(
            endpoints=tuple(by_id.values()),
            by_id=MappingProxyType(by_id),
            serving=MappingProxyType({m: tuple(es) for m, es in serving.items()}),
            tier_ids=MappingProxyType({t: tuple(ids) for t, ids in tier_ids.items()}),
            models=models,
            known_models=frozenset(known_models) | frozenset(models),
        )
