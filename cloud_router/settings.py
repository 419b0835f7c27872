"""Everything a router process is configured with; built by `edgegen router` from its flags."""

from __future__ import annotations

from dataclasses import dataclass, field

from cloud_router.forwarding import ForwardConfig
from cloud_router.identity import IdentityConfig
from cloud_router.policy import PolicyConfig
from cloud_router.stats import EjectionConfig


@dataclass(frozen=True)
class RouterSettings:
    consul: str = "http://127.0.0.1:8500"
    host: str = "127.0.0.1"
    port: int = 8080
    region: str = ""                   # default region hint for requests that carry none
    api_keys: frozenset[str] = frozenset()  # empty: no authentication
    near: str | None = None            # Consul node name for `near=` (RTT ranking), if any
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    ejection: EjectionConfig = field(default_factory=EjectionConfig)
    forward: ForwardConfig = field(default_factory=ForwardConfig)
    retry_budget_ratio: float = 0.2
    max_body_bytes: int = 2 * 1024 * 1024  # a bigger request body is a 413, unread
    # Consul ACL token sent on every read (None: anonymous); never in a repr or a log
    consul_token: str | None = field(default=None, repr=False)
    # shared with the agents: route only to endpoints that prove it (None: trust Consul)
    fleet_key: bytes | None = field(default=None, repr=False)
    identity: IdentityConfig = field(default_factory=IdentityConfig)
