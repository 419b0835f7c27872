"""The fleet: every endpoint the router knows now, and what follows from that set alone.

An immutable snapshot. The table builds a new one when discovery reports a change, as Envoy
recomputes what it derives from a host set when the set changes, not per request; per-request
code reads the current one and never merges sources itself. Pure: no I/O, no clock.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Callable, Iterable, Mapping

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
    # model -> {endpoint id: why it is not a candidate} for endpoints the gate did not admit
    # (identity not proved); they stay in ``endpoints`` and ``by_id``
    withheld: Mapping[str, Mapping[str, str]] = field(
        default_factory=lambda: MappingProxyType({}))

    @classmethod
    def of(cls, endpoints: Iterable[Endpoint],
           known_models: Iterable[str] = frozenset(),
           admit: Callable[[Endpoint], str | None] | None = None) -> Fleet:
        """The fleet of ``endpoints`` (a later one with the same id replaces an earlier one);
        ``known_models`` carries the models of earlier fleets forward, so that a model whose
        endpoints all went away is unavailable (503), not unknown (404). ``admit`` says why
        an endpoint may not be sent requests (None: it may); such an endpoint is known but
        never a candidate."""
        by_id: dict[str, Endpoint] = {}
        for e in endpoints:
            by_id[e.id] = e
        serving: dict[str, list[Endpoint]] = {}
        tier_ids: dict[str, list[str]] = {}
        withheld: dict[str, dict[str, str]] = {}
        for e in by_id.values():
            why = admit(e) if admit is not None else None
            if why is None:
                serving.setdefault(e.model, []).append(e)
                tier_ids.setdefault(e.tier, []).append(e.id)
            else:
                withheld.setdefault(e.model, {})[e.id] = why
        models = tuple(sorted(m for m in serving if m))
        return cls(
            endpoints=tuple(by_id.values()),
            by_id=MappingProxyType(by_id),
            serving=MappingProxyType({m: tuple(es) for m, es in serving.items()}),
            tier_ids=MappingProxyType({t: tuple(ids) for t, ids in tier_ids.items()}),
            models=models,
            # a model whose endpoints are all withheld is unavailable (503), not unknown
            known_models=frozenset(known_models) | frozenset(models)
            | frozenset(m for m in withheld if m),
            withheld=MappingProxyType({m: MappingProxyType(w) for m, w in withheld.items()}),
        )
