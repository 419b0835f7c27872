"""What the router knows about one serving endpoint, as read from Consul's health API.

Plain data: the discovery watcher builds these from `/v1/health/service/<name>` entries,
the policy ranks them, the forwarder sends requests to them.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Endpoint:
    id: str                    # Consul service ID: <service>-<node>-<port>
    service: str               # edgegen-edge | edgegen-central
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
