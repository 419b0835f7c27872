"""Consul's JSON shapes for the registry's state (agent/service.mdx, health.mdx, catalog.mdx).

Pure functions from state objects to the exact field names Consul answers with; the HTTP
layer only serialises what these return.
"""

from __future__ import annotations

import hashlib
import json
import uuid

from cloud_router.registry.state import CheckState, RegistryState, ServiceState


def node_id(node: str) -> str:
    """A stable UUID per node name (Consul node IDs are UUIDs)."""
    return str(uuid.uuid5(uuid.NAMESPACE_DNS, f"{node}.edgegen"))


def agent_service(state: RegistryState, s: ServiceState) -> dict:
    d = s.definition
    return {
        "ID": d.id,
        "Service": d.name,
        "Tags": list(d.tags),
        "Meta": dict(d.meta),
        "Port": d.port,
        "Address": d.address,
        "TaggedAddresses": d.tagged_addresses,
        "Weights": dict(d.weights),
        "EnableTagOverride": d.enable_tag_override,
        "Datacenter": state.datacenter,
    }


def agent_service_with_hash(state: RegistryState, s: ServiceState) -> tuple[dict, str]:
    """GET /v1/agent/service/:id: the definition plus ContentHash (also sent as a header)."""
    body = agent_service(state, s)
    digest = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]
    return {**body, "ContentHash": digest}, digest


def check_json(state: RegistryState, c: CheckState) -> dict:
    d = c.definition
    svc = state.services.get(d.service_id)
    return {
        "Node": state.node_of(svc) if svc else state.node,
        "CheckID": d.check_id,
        "Name": d.name,
        "Status": c.status,
        "Notes": d.notes,
        "Output": c.output,
        "ServiceID": d.service_id,
        "ServiceName": svc.definition.name if svc else "",
        "ServiceTags": list(svc.definition.tags) if svc else [],
        "Type": d.kind,
        "Interval": "" if d.kind == "ttl" else d.definition_json()["Interval"],
        "Timeout": "" if d.kind == "ttl" else d.definition_json()["Timeout"],
        "ExposedPort": 0,
        "Definition": d.definition_json(),
        "CreateIndex": c.create_index,
        "ModifyIndex": c.modify_index,
    }


def node_json(state: RegistryState, s: ServiceState) -> dict:
    node = state.node_of(s)
    address = s.definition.address or "127.0.0.1"
    return {
        "ID": node_id(node),
        "Node": node,
        "Address": address,
        "Datacenter": state.datacenter,
        "TaggedAddresses": {"lan": address, "lan_ipv4": address, "wan": address,
                            "wan_ipv4": address},
        "Meta": {"consul-network-segment": ""},
        "CreateIndex": s.create_index,
        "ModifyIndex": s.create_index,
    }


def health_entry(state: RegistryState, s: ServiceState) -> dict:
    """One element of GET /v1/health/service/:name."""
    svc = agent_service(state, s)
    svc.pop("Datacenter")
    svc.update({"CreateIndex": s.create_index, "ModifyIndex": s.modify_index})
    return {
        "Node": node_json(state, s),
        "Service": svc,
        "Checks": [check_json(state, c) for c in state.service_checks(s.definition.id)],
    }


def catalog_entry(state: RegistryState, s: ServiceState) -> dict:
    """One element of GET /v1/catalog/service/:name."""
    d = s.definition
    n = node_json(state, s)
    return {
        "ID": n["ID"],
        "Node": n["Node"],
        "Address": n["Address"],
        "Datacenter": state.datacenter,
        "TaggedAddresses": n["TaggedAddresses"],
        "NodeMeta": n["Meta"],
        "ServiceID": d.id,
        "ServiceName": d.name,
        "ServiceTags": list(d.tags),
        "ServiceAddress": d.address,
        "ServiceTaggedAddresses": d.tagged_addresses,
        "ServiceWeights": dict(d.weights),
        "ServiceMeta": dict(d.meta),
        "ServicePort": d.port,
        "ServiceEnableTagOverride": d.enable_tag_override,
        "CreateIndex": s.create_index,
        "ModifyIndex": s.modify_index,
    }


def catalog_services(state: RegistryState) -> dict[str, list[str]]:
    """GET /v1/catalog/services: service name → the union of its instances' tags."""
    out: dict[str, set[str]] = {}
    for s in state.services.values():
        out.setdefault(s.definition.name, set()).update(s.definition.tags)
    return {name: sorted(tags) for name, tags in sorted(out.items())}


def aggregated_status(checks: list[CheckState]) -> str:
    statuses = {c.status for c in checks}
    for worst in ("critical", "warning"):
        if worst in statuses:
            return worst
    return "passing"
