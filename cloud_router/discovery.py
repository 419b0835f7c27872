"""Following a service in Consul: the router's only module that talks to Consul.

``ServiceWatcher`` long-polls ``GET /v1/health/service/<name>?passing=1`` with blocking
queries and keeps the last table of endpoints. It follows Consul's rules for blocking
clients (features/blocking.mdx): an index that goes backwards resets to 0, the index stays
at least 1 after the first read, and the loop is rate-limited by a token bucket (burst 2)
so that a churning service degrades to polling instead of a busy loop. When Consul is
unreachable the table is kept and marked stale, never emptied, and the watcher backs off.

``endpoints_from_health`` is the pure mapping from Consul's health JSON to ``Endpoint``.

With Consul's ACLs on, every read sends the router's token (``X-Consul-Token``). A token
Consul does not know, or one that may not read, is a 403 whose text (Consul's own) is passed
on in the RegistryError; a token that may read the services but not their nodes gets an
empty or partial answer with ``X-Consul-Results-Filtered-By-ACLs: true``, which the watcher
logs once, naming the rules a discovery token needs.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import replace
from typing import Callable

import httpx

from cloud_router.endpoints import (
    CENTRAL_SERVICE,
    META_DIGEST,
    META_LAT,
    META_LON,
    META_MAX_CONCURRENCY,
    META_MODEL,
    META_MQTT,
    META_NODE,
    META_REGION,
    META_TIER,
    META_ZONE,
    Endpoint,
)
from cloud_router.errors import RegistryError
from cloud_router.geo import latitude, longitude
from cloud_router.registry.coordinates import rtt_seconds
from cloud_router.registry.definitions import parse_duration

logger = logging.getLogger(__name__)


def _int(value) -> int:
    try:
        return max(int(value), 0)
    except (TypeError, ValueError):
        return 0


def endpoints_from_health(entries: list[dict]) -> list[Endpoint]:
    """Consul's ``/v1/health/service/<name>`` entries (Node, Service, Checks) → Endpoints,
    in the order given (Consul's ``near`` order). Entries without a service ID or port are
    skipped; Meta values that do not parse fall back to the field's default."""
    out: list[Endpoint] = []
    for entry in entries or []:
        if not isinstance(entry, dict):
            continue
        svc = entry.get("Service") or {}
        node = entry.get("Node") or {}
        meta = svc.get("Meta") or {}
        sid, port = svc.get("ID"), svc.get("Port")
        if not sid or not isinstance(port, int) or port <= 0:
            logger.debug("skipping a health entry without ID or port", extra={"id": sid})
            continue
        name = svc.get("Service", "")
        tier = meta.get(META_TIER) or ("central" if name == CENTRAL_SERVICE else "edge")
        out.append(Endpoint(
            id=sid,
            service=name,
            node=meta.get(META_NODE) or node.get("Node", ""),
            address=svc.get("Address") or node.get("Address", ""),
            port=port,
            tier=tier,
            model=meta.get(META_MODEL, ""),
            digest=meta.get(META_DIGEST, ""),
            region=meta.get(META_REGION, ""),
            zone=meta.get(META_ZONE, ""),
            lat=latitude(meta.get(META_LAT)),
            lon=longitude(meta.get(META_LON)),
            max_concurrency=_int(meta.get(META_MAX_CONCURRENCY)),
            mqtt=meta.get(META_MQTT, ""),
            tags=tuple(svc.get("Tags") or ()),
            meta=dict(meta),
        ))
    return out


def with_rtt(endpoints: list[Endpoint], entries: list[dict], coordinates: list[dict],
             near: str) -> list[Endpoint]:
    """Endpoints with ``rtt_ms``: Consul's RTT estimate from node ``near`` to each endpoint's
    catalog node, from ``/v1/coordinate/nodes``; None where a coordinate is missing."""
    coords = {c.get("Node"): c.get("Coord") for c in coordinates if isinstance(c, dict)}
    origin = coords.get(near)
    catalog_node = {(e.get("Service") or {}).get("ID"): (e.get("Node") or {}).get("Node")
                    for e in entries if isinstance(e, dict)}
    out = []
    for ep in endpoints:
        target = coords.get(catalog_node.get(ep.id))
        rtt = None
        if origin and target:
            try:
                rtt = round(rtt_seconds(origin, target) * 1000, 3)
            except (KeyError, TypeError, ValueError):
                rtt = None
        out.append(replace(ep, rtt_ms=rtt))
    return out


def consul_headers(token: str | None) -> dict[str, str]:
    """The headers that carry a Consul ACL token (none for the anonymous token)."""
    return {"X-Consul-Token": token} if token else {}


def _acl_refusal(url: str, status: int, text: str, token: str | None) -> RegistryError:
    who = "the token given" if token else "no token (Consul's anonymous token)"
    return RegistryError(
        f"{url}: HTTP {status}: Consul refused {who}: {text.strip()[:300]} -- give a token "
        "that may read the edgegen services and their nodes (service_prefix \"edgegen-\" and "
        "node_prefix \"\" read) with --consul-token-file or CONSUL_HTTP_TOKEN")


def next_index(previous: int, returned: int) -> int:
    """Consul's client rules for the index of the next blocking query."""
    if returned < previous:
        return 0          # went backwards (restore, restart): start over
    return max(returned, 1)


class TokenBucket:
    """Allows ``burst`` quick iterations, then one per ``interval`` seconds."""

    def __init__(self, burst: int = 2, interval: float = 1.0,
                 clock: Callable[[], float] = time.monotonic):
        self.burst, self.interval, self.clock = burst, interval, clock
        self.tokens = float(burst)
        self.stamp = clock()

    def delay(self) -> float:
        """Take a token; return how long to sleep first (0 when one was available)."""
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) / self.interval)
        self.stamp = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        wait = (1 - self.tokens) * self.interval
        self.tokens = 0.0
        self.stamp = now + wait
        return wait


async def read_health(client: httpx.AsyncClient, consul_url: str, service: str, *,
                      passing: bool = True, index: int = 0, wait: str | None = None,
                      wait_s: float = 0.0, near: str | None = None,
                      timeout: float = 10.0, token: str | None = None,
                      acl_filtered: Callable[[bool], None] | None = None
                      ) -> tuple[int, list[dict]]:
    """``GET /v1/health/service/<service>``: Consul's index and its raw entries (with their
    ``Checks``). A blocking query when ``index`` and ``wait`` are given. The one place the
    router and ``edgegen status`` read Consul's health API; RegistryError when they cannot
    (a 403 says what Consul said about the token). ``acl_filtered`` hears whether Consul
    dropped entries the token may not read."""
    params = {"passing": "1"} if passing else {}
    if index > 0 and wait:
        params.update(index=str(index), wait=wait)
    if near:
        params["near"] = near
    if index > 0 and wait:  # Consul may hold a blocking request for wait + wait/16 of jitter
        timeout = wait_s * 17 / 16 + 5.0
    url = f"{consul_url.rstrip('/')}/v1/health/service/{service}"
    try:
        r = await client.get(url, params=params, timeout=timeout, headers=consul_headers(token))
    except httpx.HTTPError as exc:
        raise RegistryError(f"{url}: {type(exc).__name__}: {exc}") from exc
    if r.status_code in (401, 403):
        raise _acl_refusal(url, r.status_code, r.text, token)
    if r.status_code != 200:
        raise RegistryError(f"{url}: HTTP {r.status_code}: {r.text[:200]}")
    if acl_filtered is not None:
        acl_filtered(r.headers.get("X-Consul-Results-Filtered-By-ACLs") == "true")
    try:
        returned = int(r.headers["X-Consul-Index"])
        body = r.json()
    except (KeyError, ValueError) as exc:
        raise RegistryError(f"{url}: not a Consul answer ({exc})") from exc
    if not isinstance(body, list):
        raise RegistryError(f"{url}: expected a JSON list")
    return returned, body


class ServiceWatcher:
    """The live table of one Consul service's passing instances.

    An endpoint source for the router's table: ``generation`` moves whenever ``endpoints``
    changes, so the table rebuilds its fleet only then.
    """

    def __init__(self, consul_url: str, service: str, *,
                 on_change: Callable[[list[Endpoint]], None] | None = None,
                 near: str | None = None, wait: str = "30s",
                 rate_interval: float = 1.0, max_backoff: float = 10.0,
                 transport: httpx.AsyncBaseTransport | None = None,
                 token: str | None = None):
        self.consul_url = consul_url.rstrip("/")
        self.service = service
        self._token = token
        self.acl_filtered = False     # Consul dropped entries the token may not read
        self.on_change = on_change
        self.near = near
        self.wait = wait
        self._wait_s = parse_duration(wait, "wait")
        self.max_backoff = max_backoff
        self._bucket = TokenBucket(burst=2, interval=rate_interval)
        self._transport = transport
        self._endpoints: list[Endpoint] = []
        self._stale = True            # nothing read yet
        self._loaded = False
        self.last_index = 0
        self.last_error: str | None = None
        self.generation = 0           # +1 each time the endpoints change
        self._updated = asyncio.Event()

    @property
    def endpoints(self) -> list[Endpoint]:
        return list(self._endpoints)

    @property
    def stale(self) -> bool:
        return self._stale

    @property
    def loaded(self) -> bool:
        """True once one read has succeeded."""
        return self._loaded

    async def wait_loaded(self, timeout: float) -> bool:
        """Wait until the first successful read (or ``timeout``); True when loaded."""
        try:
            await asyncio.wait_for(self._wait_first(), timeout)
        except TimeoutError:
            return False
        return True

    async def _wait_first(self) -> None:
        while not self._loaded:
            await self._updated.wait()

    async def fetch(self, client: httpx.AsyncClient) -> tuple[int, list[dict]]:
        """One (blocking) read of the passing instances; RegistryError when Consul cannot be
        read."""
        blocking = self.last_index > 0
        return await read_health(client, self.consul_url, self.service, passing=True,
                                 index=self.last_index if blocking else 0,
                                 wait=self.wait if blocking else None,
                                 wait_s=self._wait_s, near=self.near, token=self._token,
                                 acl_filtered=self._note_filtered)

    def _note_filtered(self, filtered: bool) -> None:
        if filtered and not self.acl_filtered:
            logger.warning(
                "consul dropped entries this token may not read; discovery needs "
                "service_prefix \"edgegen-\" and node_prefix \"\" read",
                extra={"service": self.service})
        self.acl_filtered = filtered

    async def _coordinates(self, client: httpx.AsyncClient) -> list[dict] | None:
        """Network coordinates for ``rtt_ms``; None (no RTT) when they cannot be read."""
        try:
            r = await client.get(f"{self.consul_url}/v1/coordinate/nodes", timeout=10.0,
                                 headers=consul_headers(self._token))
            body = r.json() if r.status_code == 200 else None
        except (httpx.HTTPError, ValueError):
            return None
        return body if isinstance(body, list) else None

    def _apply(self, index: int, entries: list[dict],
               coordinates: list[dict] | None = None) -> None:
        self.last_index = next_index(self.last_index, index)
        endpoints = endpoints_from_health(entries)
        if self.near and coordinates is not None:
            endpoints = with_rtt(endpoints, entries, coordinates, self.near)
        changed = not self._loaded or endpoints != self._endpoints
        self._endpoints = endpoints
        if changed:  # after the endpoints: a reader that sees the new generation sees them
            self.generation += 1
        self._loaded = True
        if self._stale:
            logger.info("consul reachable", extra={"service": self.service,
                                                   "endpoints": len(endpoints)})
        self._stale = False
        self.last_error = None
        if changed:
            logger.info("endpoints changed", extra={
                "service": self.service, "ids": [e.id for e in endpoints],
                "index": self.last_index})
            if self.on_change is not None:
                try:
                    self.on_change(list(endpoints))
                except Exception:  # noqa: BLE001 - a subscriber's bug must not stop the watch
                    logger.exception("on_change subscriber failed")
        old, self._updated = self._updated, asyncio.Event()
        old.set()

    async def run(self) -> None:
        """Follow the service until cancelled."""
        backoff = 0.0
        async with httpx.AsyncClient(transport=self._transport, trust_env=False) as client:
            while True:
                delay = self._bucket.delay()
                if delay:
                    await asyncio.sleep(delay)
                try:
                    index, entries = await self.fetch(client)
                except RegistryError as exc:
                    if not self._stale or self.last_error is None:
                        logger.warning("consul unreachable; keeping the last table",
                                       extra={"service": self.service, "error": str(exc),
                                              "endpoints": len(self._endpoints)})
                    self._stale = True
                    self.last_error = str(exc)
                    # The registry may come back with a lower index (restart without a
                    # data dir): start again with a non-blocking read.
                    self.last_index = 0
                    backoff = min(self.max_backoff, max(0.25, backoff * 2))
                    await asyncio.sleep(backoff * random.uniform(0.5, 1.0))
                    continue
                backoff = 0.0
                coordinates = await self._coordinates(client) if self.near else None
                self._apply(index, entries, coordinates)


async def read_endpoints(consul_url: str, services: tuple[str, ...], *,
                         token: str | None = None, passing: bool = True,
                         timeout: float = 10.0) -> list[Endpoint]:
    """One non-blocking read of ``services`` (RegistryError when Consul cannot be read)."""
    out: list[Endpoint] = []
    async with httpx.AsyncClient(trust_env=False) as client:
        for name in services:
            _index, entries = await read_health(client, consul_url, name, passing=passing,
                                                timeout=timeout, token=token)
            out.extend(endpoints_from_health(entries))
    return out
