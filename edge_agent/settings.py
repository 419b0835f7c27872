"""Everything an edge agent process is configured with; built by `edgegen agent` from its flags.

One frozen object shared by the HTTP app, the engine, Consul registration and the MQTT bridge,
so that each part reads the same values and nothing reads the environment on its own.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from edge_agent.bundle import default_store


@dataclass(frozen=True)
class AgentSettings:
    bundle: str                       # a bundle directory, or an http(s) URL to fetch it from
    node: str                         # node name: Consul Meta.node, MQTT topic, x-edgegen-node
    port: int = 8000
    host: str = "127.0.0.1"
    advertise_host: str | None = None  # address others reach us at (Consul); default: host
    tier: str = "edge"                # "edge" or "central"
    region: str = ""
    zone: str = ""
    lat: float | None = None
    lon: float | None = None
    device: str = "cpu"               # cpu | cuda | tensorrt
    threads: int | None = None        # intra-op threads; None = the machine's core count
    max_concurrency: int = 4          # sequences decoded together
    queue_size: int = 16              # requests waiting beyond max_concurrency before 429
    max_tokens_default: int = 256     # when a request names no max_tokens
    stream_interval_ms: int = 20      # streams get new tokens every N ms (0: every step)
    prefix_cache_mb: int = 256        # RAM for the KV of cached prompt prefixes (0: no cache)
    drain_timeout: float = 30.0       # seconds in-flight requests get on SIGTERM or bundle swap
    admin_token: str | None = field(default=None, repr=False)  # bearer for POST /edgegen/v1/bundle
    store: Path = field(default_factory=default_store)  # content-addressed bundle cache
    consul: str | None = None         # http://host:8500 to register in Consul
    follow: bool = False              # serve the node's desired bundle from Consul's KV store
    mqtt: str | None = None           # mqtt[s]://[user:pass@]host:port for the device bridge
    mqtt_ca_file: str | None = None
    mqtt_username: str | None = None  # wins over the URL's user; AGENT_USER on edgegen's brokers
    mqtt_password: str | None = field(default=None, repr=False)  # never in argv nor in logs
    mqtt_coalesce_ms: int = 50        # streaming: flush a chunk message at least this often
    mqtt_coalesce_tokens: int = 8     # ... or after this many tokens
    mqtt_max_payload: int = 256 * 1024
    max_body_bytes: int = 2 * 1024 * 1024  # a bigger HTTP request body is a 413, unread
    consul_token: str | None = field(default=None, repr=False)  # Consul ACL token (never logged)
    fleet_key: bytes | None = field(default=None, repr=False)   # proves this agent to routers
    trust_keys: tuple[str, ...] = ()  # public key files/dirs; a bundle must be signed by one

    @property
    def address(self) -> str:
        return self.advertise_host or self.host
