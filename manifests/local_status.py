"""`edgegen status --target local`: the agents a registry (Consul API) knows, and their health.

The registry is read with the router's own Consul reader (``cloud_router.discovery.read_health``,
asking for every instance, passing or not) and an agent's registration is understood by the
router's own mapping (``endpoints_from_health``), so status shows the agents as the router
sees them.
"""

from __future__ import annotations

import asyncio

import httpx

from cloud_router.discovery import endpoints_from_health, read_health
from cloud_router.endpoints import CENTRAL_SERVICE, EDGE_SERVICE
from cloud_router.errors import RegistryError
from manifests.deploy import AgentRow
from manifests.errors import ClusterError

SERVICES = (EDGE_SERVICE, CENTRAL_SERVICE)


def registry_status(consul: str, timeout: float = 5.0, token: str | None = None
                    ) -> list[AgentRow]:
    """One row per registered agent, passing or not, from ``/v1/health/service/<name>``;
    ``token`` is the Consul ACL token to read with (None: anonymous)."""

    async def read_all() -> list[dict]:
        async with httpx.AsyncClient() as client:
            return [entry for service in SERVICES for entry in
                    (await read_health(client, consul, service, passing=False,
                                       timeout=timeout, token=token))[1]]

    try:
        entries = asyncio.run(read_all())
    except RegistryError as exc:
        raise ClusterError(f"cannot ask the registry at {consul}: {exc}") from exc
    return sorted(agent_rows(entries), key=lambda r: (r.tier, r.node))


def agent_rows(entries: list[dict]) -> list[AgentRow]:
    """Consul health entries → rows: the router's endpoints, ready when every check passes."""
    passing = {(e.get("Service") or {}).get("ID"):
               all(c.get("Status") == "passing" for c in e.get("Checks") or [])
               for e in entries if isinstance(e, dict)}
    return [AgentRow(node=ep.node, tier=ep.tier, bundle=f"{ep.model or '?'} {ep.digest[:12]}",
                     ready=passing[ep.id], address=f"{ep.address}:{ep.port}",
                     detail=f"{ep.region}/{ep.zone}")
            for ep in endpoints_from_health(entries)]
