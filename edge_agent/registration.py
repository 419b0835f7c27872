"""Registering the agent in Consul: the agent's only module that talks to Consul (py-consul).

The agent registers through the agent API (``/v1/agent/service/register``) with the service
name, ID, tags, Meta and HTTP check of DESIGN.md's Consul contract, then keeps checking
that the registry still knows it (``GET /v1/agent/service/<id>``) and registers again when
it does not (a registry restarted without its data). Consul being down never stops the
agent: a background task retries with exponential backoff and logs once per state change,
not once per try. A clean shutdown deregisters, bounded in time.

With Consul's ACLs on, every call carries the agent's token (``settings.consul_token``, sent
by py-consul as ``X-Consul-Token``): registering and deregistering need ``service:write`` on
the agent's service name, the resync read ``service:read``. A refusal (403, py-consul's
``ACLPermissionDenied`` with Consul's text) is logged as such, once, and retried like an
unreachable Consul: the token may be fixed without restarting the agent's serving.

``registration_payload`` is the pure part: settings + bundle → what is registered.
"""

from __future__ import annotations

import asyncio
import logging
import random
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import consul
import consul.aio
import requests

from edge_agent.bundle import Bundle
from edge_agent.errors import RegistrationError
from edge_agent.settings import AgentSettings

logger = logging.getLogger(__name__)

CHECK_INTERVAL = "2s"
CHECK_TIMEOUT = "1s"
DEREGISTER_AFTER = "1m"


# The wire contract with the router's discovery (cloud_router.endpoints reads the same names
# and Meta keys; the packages share no code, and tests/test_wire_contracts.py pins the copies).
EDGE_SERVICE = "edgegen-edge"
CENTRAL_SERVICE = "edgegen-central"


def service_name(tier: str) -> str:
    return CENTRAL_SERVICE if tier == "central" else EDGE_SERVICE


def service_id(settings: AgentSettings) -> str:
    return f"{service_name(settings.tier)}-{settings.node}-{settings.port}"


def _public_url(url: str | None) -> str:
    """A broker URL without its credentials: Consul Meta is readable by every client."""
    if not url:
        return ""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def registration_payload(settings: AgentSettings, bundle: Bundle) -> dict:
    """Keyword arguments for py-consul's ``agent.service.register`` (Meta values are strings,
    as Consul requires)."""
    host = settings.address
    url_host = f"[{host}]" if ":" in host else host
    meta = {
        "node": settings.node,
        "region": settings.region,
        "zone": settings.zone,
        "lat": "" if settings.lat is None else repr(float(settings.lat)),
        "lon": "" if settings.lon is None else repr(float(settings.lon)),
        "model": bundle.name,
        "digest": bundle.digest12,
        "tier": settings.tier,
        "max_concurrency": str(settings.max_concurrency),
        "mqtt": _public_url(settings.mqtt),
    }
    return {
        "name": service_name(settings.tier),
        "service_id": service_id(settings),
        "address": host,
        "port": settings.port,
        "tags": [f"model={bundle.name}", f"digest={bundle.digest12}"],
        "meta": meta,
        "check": consul.Check.http(f"http://{url_host}:{settings.port}/readyz", CHECK_INTERVAL,
                                   timeout=CHECK_TIMEOUT, deregister=DEREGISTER_AFTER),
    }


def _client(url: str, timeout: float, token: str | None = None, *,
            kind: type[consul.base.Consul] = consul.Consul) -> consul.base.Consul:
    parts = urlsplit(url if "://" in url else f"http://{url}")
    client = kind(host=parts.hostname or "127.0.0.1", port=parts.port or 8500,
                  scheme=parts.scheme or "http", token=token, connections_timeout=timeout)
    # py-consul prefers $CONSUL_HTTP_TOKEN over the token it is given; the settings already
    # resolved the environment and the token file, so theirs is the token.
    client.token = token
    return client


class ConsulRegistration:
    """Keeps one agent registered in Consul for as long as it runs."""

    def __init__(self, settings: AgentSettings, bundle: Bundle, *,
                 resync_interval: float = 2.0, max_backoff: float = 10.0,
                 request_timeout: float = 2.0):
        if not settings.consul:
            raise ValueError("settings.consul is not set")
        self.settings = settings
        self.bundle = bundle
        self.service_id = service_id(settings)
        self.resync_interval = resync_interval
        self.max_backoff = max_backoff
        self.request_timeout = request_timeout
        self._consul = _client(settings.consul, request_timeout, settings.consul_token)
        self._task: asyncio.Task | None = None
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()
        self.registered = False
        self.stopped = False
        self.state = "starting"   # starting | registered | unreachable | denied

    # ---- public API ----------------------------------------------------------------------

    async def start(self) -> None:
        """Start registering in the background; returns at once, never raises."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="consul-registration")

    async def update(self, bundle: Bundle) -> None:
        """Re-register with the new bundle's name and digest (after a hot swap)."""
        self.bundle = bundle
        if self.stopped:  # draining: a swap must not bring the service back
            return
        try:
            async with self._lock:
                await self._call(self._consul.agent.service.register,
                                 **registration_payload(self.settings, bundle))
            self.registered = True
            logger.info("consul registration updated",
                        extra={"service_id": self.service_id, "digest": bundle.digest12})
        except RegistrationError as exc:
            # The background loop registers the new bundle once Consul answers again.
            self.registered = False
            self._set_state(_failure_state(exc), str(exc))
            self._wake.set()

    async def stop(self, timeout: float = 3.0) -> None:
        """Stop the background task and deregister (bounded by ``timeout`` seconds). Called
        when a drain begins and again at shutdown: only the first call does anything."""
        if self.stopped:
            return
        self.stopped = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        client = _client(self.settings.consul, min(self.request_timeout, timeout),
                         self.settings.consul_token)
        try:
            await asyncio.wait_for(
                self._call(client.agent.service.deregister, self.service_id), timeout)
            logger.info("deregistered from consul", extra={"service_id": self.service_id})
        except (RegistrationError, TimeoutError) as exc:
            logger.warning("could not deregister from consul; its check will expire instead",
                           extra={"service_id": self.service_id, "error": str(exc)})
        self.registered = False

    # ---- internals -----------------------------------------------------------------------

    async def _call(self, fn, *args, **kwargs):
        try:
            return await asyncio.to_thread(fn, *args, **kwargs)
        except consul.ACLPermissionDenied as exc:
            who = "the token given" if self.settings.consul_token else \
                "no token (Consul's anonymous token)"
            raise RegistrationError(
                f"consul at {self.settings.consul} refused {who}: {exc} -- give a token with "
                f"service:write on {service_name(self.settings.tier)!r} (--consul-token-file "
                "or CONSUL_HTTP_TOKEN)") from exc
        except (consul.ConsulException, requests.RequestException, OSError) as exc:
            raise RegistrationError(f"consul at {self.settings.consul}: {exc}") from exc

    async def _known(self) -> bool:
        """Whether Consul still has this service. (py-consul's ``service_definition`` sends
        no token, which a Consul with ACLs refuses; the filtered list carries it.)"""
        services = await self._call(self._consul.agent.services,
                                    filter_expr=f'ID == "{self.service_id}"')
        return self.service_id in (services or {})

    def _set_state(self, state: str, error: str | None = None) -> None:
        if state == self.state:
            return
        self.state = state
        extra = {"service_id": self.service_id, "consul": self.settings.consul}
        if state == "registered":
            logger.info("registered in consul", extra=extra)
        elif state == "denied":
            logger.warning("consul refused this agent's token (ACL); serving anyway and "
                           "retrying registration", extra={**extra, "error": error})
        else:
            logger.warning("consul unreachable; serving anyway and retrying registration",
                           extra={**extra, "error": error})

    async def _sleep(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self._wake.wait(), seconds)
        except TimeoutError:
            pass
        self._wake.clear()

    async def _run(self) -> None:
        backoff = 0.0
        # Not `while True`: on Python 3.11, a cancel that lands as _sleep's wait_for wakes
        # (update() set _wake just before stop()) is swallowed, and the loop would go on.
        while not self.stopped:
            try:
                if not self.registered:
                    async with self._lock:
                        await self._call(self._consul.agent.service.register,
                                         **registration_payload(self.settings, self.bundle))
                    self.registered = True
                    self._set_state("registered")
                else:
                    if not await self._known():
                        logger.warning("consul forgot this service; registering again",
                                       extra={"service_id": self.service_id})
                        self.registered = False
                        continue
                    self._set_state("registered")
                backoff = 0.0
                await self._sleep(self.resync_interval)
            except RegistrationError as exc:
                self.registered = False
                self._set_state(_failure_state(exc), str(exc))
                backoff = min(self.max_backoff, max(0.5, backoff * 2))
                await self._sleep(backoff * random.uniform(0.75, 1.0))


def _failure_state(exc: RegistrationError) -> str:
    """denied when Consul refused the token (403), else unreachable."""
    return "denied" if isinstance(exc.__cause__, consul.ACLPermissionDenied) else "unreachable"


class ConsulKV:
    """The fleet's desired state in Consul's KV store: one agent's reads (blocking queries)
    and writes of its own keys. Errors are RegistrationErrors, as registration's are.

    It uses py-consul's asyncio client, so that stopping the agent ends a blocking query at
    once: in a worker thread, the query held the process's exit for up to ``wait_s`` (the
    interpreter waits for its threads), past ``edgegen``'s and a pod's grace period."""

    def __init__(self, settings: AgentSettings, *, wait_s: float = 30.0,
                 request_timeout: float = 2.0):
        if not settings.consul:
            raise ValueError("settings.consul is not set")
        self.settings = settings
        self.wait_s = wait_s
        # a blocking query holds the connection for up to wait_s (plus Consul's jitter)
        self._timeout = wait_s + wait_s / 16 + request_timeout
        self._consul: consul.aio.Consul | None = None  # made in the loop, on first use

    async def get(self, key: str, index: int | None = None) -> tuple[int, bytes | None]:
        """(the KV index, the key's value or None when it is missing); with ``index``, waits
        up to ``wait_s`` for the key to change past it."""
        wait = f"{int(self.wait_s)}s" if index else None
        idx, entry = await self._call(lambda kv: kv.get(key, index=index, wait=wait))
        value = entry.get("Value") if isinstance(entry, dict) else None
        return int(idx or 0), value

    async def put(self, key: str, value: bytes) -> bool:
        return bool(await self._call(lambda kv: kv.put(key, value)))

    async def close(self) -> None:
        if self._consul is not None:
            client, self._consul = self._consul, None
            await client.close()

    async def _call(self, request):
        if self._consul is None:
            self._consul = _client(self.settings.consul, self._timeout,
                                   self.settings.consul_token, kind=consul.aio.Consul)
        try:
            return await request(self._consul.kv)
        except (TimeoutError, consul.ConsulException, aiohttp.ClientError, OSError) as exc:
            raise RegistrationError(f"consul KV at {self.settings.consul}: "
                                    f"{exc or type(exc).__name__}") from exc
