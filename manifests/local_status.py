"""`edgegen status --target local`: the agents a registry (Consul API) knows, and their health."""

from __future__ import annotations

import httpx

from manifests.deploy import AgentRow
from manifests.errors import ClusterError

SERVICES = ("edgegen-edge", "edgegen-central")


def registry_status(consul: str, timeout: float = 5.0) -> list[AgentRow]:
    """One row per registered agent, from Consul's ``/v1/health/service/<name>``."""
    rows = []
    for service in SERVICES:
        try:
            r = httpx.get(f"{consul.rstrip('/')}/v1/health/service/{service}", timeout=timeout)
            r.raise_for_status()
        except httpx.HTTPError as exc:
            raise ClusterError(f"cannot ask the registry at {consul}: {exc}") from exc
        for entry in r.json():
            svc = entry.get("Service") or {}
            meta = svc.get("Meta") or {}
            checks = entry.get("Checks") or []
            rows.append(AgentRow(
                node=meta.get("node") or (entry.get("Node") or {}).get("Node", ""),
                tier=meta.get("tier", "central" if service.endswith("central") else "edge"),
                bundle=f"{meta.get('model', '?')} {meta.get('digest', '')[:12]}",
                ready=all(c.get("Status") == "passing" for c in checks),
                address=f"{svc.get('Address', '')}:{svc.get('Port', '')}",
                detail=f"{meta.get('region', '')}/{meta.get('zone', '')}",
            ))
    return sorted(rows, key=lambda r: (r.tier, r.node))
