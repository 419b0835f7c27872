"""What the router knows about one serving endpoint, as read from Consul's health API, and
the names it is read by.

Plain data: the discovery watcher builds these from `/v1/health/service/<name>` entries,
the policy ranks them, the forwarder sends requests to them. The service names and Meta keys
below are the wire contract with the agent, which registers them (the packages share no
code; a contract test pins the agent's copy to these).
"""

from __future__ import annotations

from dataclasses import dataclass, field

EDGE_SERVICE = "edgegen-edge"
CENTRAL_SERVICE = "edgegen-central"

# The Meta keys of a registration that discovery reads (Consul Meta values are strings).
META_NODE = "node"
META_REGION = "region"
META_ZONE = "zone"
META_LAT = "lat"
META_LON = "lon"
META_MODEL = "model"
META_DIGEST = "digest"
META_TIER = "tier"
META_MAX_CONCURRENCY = "max_concurrency"
META_MQTT = "mqtt"
META_KEYS = (META_NODE, META_REGION, META_ZONE, META_LAT, META_LON, META_MODEL, META_DIGEST,
             META_TIER, META_MAX_CONCURRENCY, META_MQTT)


@dataclass(frozen=True)
class Endpoint:
    id: str                    # Consul service ID: <service>-<node>-<port>
    service: str               # EDGE_SERVICE | CENTRAL_SERVICE
    node: str
    address: str
    port: int
    tier: str = "edge"         # edge | central
    model: str = ""
    digest: str = ""
    region: str = ""
    zone: str = ""
    lat: float | None = None
    lon: float | None = None
    max_concurrency: int = 0   # 0 = unknown / unlimited
    mqtt: str = ""
    tags: tuple[str, ...] = ()
    meta: dict = field(default_factory=dict, compare=False, hash=False)
    rtt_ms: float | None = None  # Consul network-coordinate RTT estimate, when `near` was used

    @property
    def url(self) -> str:
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"http://{host}:{self.port}"
