"""Read queries over the registry state, shaped as Consul answers them. Pure."""

from __future__ import annotations

from cloud_router.registry import views
from cloud_router.registry.coordinates import coordinate_from_location, location_of, rtt_seconds
from cloud_router.registry.filtering import Predicate
from cloud_router.registry.state import RegistryState


def node_coordinates(state: RegistryState) -> dict[str, dict]:
    """node name → Coord, for nodes whose services carry Meta.lat/lon."""
    coords: dict[str, dict] = {}
    for s in state.services.values():
        loc = location_of(s.definition.meta)
        node = state.node_of(s)
        if loc is not None and node not in coords:
            coords[node] = coordinate_from_location(*loc)
    return coords


def coordinate_nodes(state: RegistryState) -> list[dict]:
    """GET /v1/coordinate/nodes."""
    return [{"Node": node, "Segment": "", "Partition": "default", "Coord": coord}
            for node, coord in sorted(node_coordinates(state).items())]


def sort_near(state: RegistryState, entries: list[dict], near: str | None,
              node_of=lambda e: e["Node"]["Node"]) -> list[dict]:
    """Ascending estimated RTT from node ``near``; nodes without coordinates last, and the
    input order kept when ``near`` has no coordinate (as Consul does)."""
    if not near:
        return entries
    coords = node_coordinates(state)
    origin = coords.get(state.node if near == "_agent" else near)
    if origin is None:
        return entries

    def key(e: dict) -> tuple[int, float]:
        c = coords.get(node_of(e))
        return (0, rtt_seconds(origin, c)) if c is not None else (1, 0.0)

    return sorted(entries, key=key)


def health_service(state: RegistryState, name: str, *, passing: bool = False,
                   near: str | None = None, predicate: Predicate | None = None) -> list[dict]:
    """GET /v1/health/service/:name."""
    entries = []
    for s in state.instances(name):
        checks = state.service_checks(s.definition.id)
        if passing and any(c.status != "passing" for c in checks):
            continue
        entry = views.health_entry(state, s)
        if predicate is None or predicate(entry):
            entries.append(entry)
    entries.sort(key=lambda e: (e["Node"]["Node"], e["Service"]["ID"]))
    return sort_near(state, entries, near)


def catalog_service(state: RegistryState, name: str, *, near: str | None = None,
                    predicate: Predicate | None = None) -> list[dict]:
    """GET /v1/catalog/service/:name."""
    entries = [views.catalog_entry(state, s) for s in state.instances(name)]
    entries = [e for e in entries if predicate is None or predicate(e)]
    entries.sort(key=lambda e: (e["Node"], e["ServiceID"]))
    return sort_near(state, entries, near, node_of=lambda e: e["Node"])


def agent_services(state: RegistryState, predicate: Predicate | None = None) -> dict[str, dict]:
    """GET /v1/agent/services."""
    out = {}
    for sid, s in sorted(state.services.items()):
        svc = views.agent_service(state, s)
        if predicate is None or predicate(svc):
            out[sid] = svc
    return out
