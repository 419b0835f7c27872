"""A Traefik dynamic configuration (file provider, Traefik v3 syntax) for the current table.

For users who put Traefik (K3s's bundled ingress) in front of the fleet instead of, or
beside, the router: one load-balanced service per region with health checks on `/readyz`,
a weighted service across regions (weight = the region's capacity), a failover service from
the edge tier to the central tier, per-region routers picked by the `x-edgegen-region`
header, and a retry middleware. Traefik cannot rank by distance or in-flight requests; that is
what the router adds.
"""

from __future__ import annotations

import re
from collections import defaultdict

import yaml

from cloud_router.endpoints import Endpoint

HEALTH = {"path": "/readyz", "interval": "2s", "timeout": "1s"}
PATHS = "PathPrefix(`/v1/`)"


def _name(text: str) -> str:
    return re.sub(r"[^a-zA-Z0-9-]+", "-", text).strip("-").lower() or "default"


def _lb(endpoints: list[Endpoint]) -> dict:
    return {"loadBalancer": {"servers": [{"url": e.url} for e in endpoints],
                             "healthCheck": dict(HEALTH), "passHostHeader": True}}


def traefik_config(endpoints: list[Endpoint], retry_attempts: int = 3) -> dict:
    """The dynamic configuration as a dict (see :func:`traefik_yaml`)."""
    edges: dict[str, list[Endpoint]] = defaultdict(list)
    central = [e for e in endpoints if e.tier == "central"]
    for e in endpoints:
        if e.tier == "edge":
            edges[_name(e.region or "default")].append(e)
    services: dict[str, dict] = {}
    routers: dict[str, dict] = {}
    middlewares = {"edgegen-retry": {"retry": {"attempts": retry_attempts,
                                               "initialInterval": "100ms"}}}
    for region, eps in sorted(edges.items()):
        services[f"edgegen-edge-{region}"] = _lb(eps)
    if edges:
        services["edgegen-edge"] = {"weighted": {"services": [
            {"name": f"edgegen-edge-{r}",
             "weight": sum(e.max_concurrency or 1 for e in eps)}
            for r, eps in sorted(edges.items())], "healthCheck": {}}}
    if central:
        services["edgegen-central"] = _lb(central)
    if edges and central:
        services["edgegen-fleet"] = {"failover": {"service": "edgegen-edge",
                                                  "fallback": "edgegen-central",
                                                  "healthCheck": {}}}
    fleet = "edgegen-fleet" if edges and central else (
        "edgegen-edge" if edges else "edgegen-central" if central else None)
    if fleet is None:
        return {"http": {"middlewares": middlewares}}
    routers["edgegen"] = {"rule": PATHS, "service": fleet, "middlewares": ["edgegen-retry"],
                          "priority": 1}
    for region, eps in sorted(edges.items()):
        raw = eps[0].region
        if not raw:
            continue
        name = f"edgegen-region-{region}"
        services[name] = {"failover": {"service": f"edgegen-edge-{region}", "fallback": fleet,
                                       "healthCheck": {}}}
        routers[name] = {"rule": f"{PATHS} && Header(`x-edgegen-region`, `{raw}`)",
                         "service": name, "middlewares": ["edgegen-retry"], "priority": 10}
    return {"http": {"routers": routers, "services": services, "middlewares": middlewares}}


def traefik_yaml(endpoints: list[Endpoint], retry_attempts: int = 3) -> str:
    return yaml.safe_dump(traefik_config(endpoints, retry_attempts), sort_keys=False)
