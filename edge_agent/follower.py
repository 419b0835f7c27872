"""The agent follows the fleet's desired state (``edge_agent.desired``) in Consul's KV store.

A blocking query on the node's ``desired`` key wakes the follower when a rollout writes it.
The named bundle is fetched and verified into the store in the background (resumable,
sha256-verified, refused before downloading when the disk cannot hold it) while the current
one keeps serving; when the desired state says ``switch``, the agent hot-swaps to it (no
request is lost: the old model drains) and keeps the old bundle's files as its last good
one. A rollback is a desired state naming a bundle the node still has on disk: no download.
Every step is reported in the node's ``status`` key.

The bundle being served is remembered in the store (``remembered``), so an agent that
restarts serves it again from disk, whether or not the registry is reachable, instead of
the bundle its command line seeded it with, as long as that seed is the one it started
with (a new ``--bundle``, as a redeploy gives, wins). A registry that goes away is retried
with backoff; the agent serves on.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from edge_agent.bundle import Bundle, find_in_store
from edge_agent.bundle.fetch import fetch_bundle
from edge_agent.bundle.signing import open_trusted
from edge_agent.desired import (
    Desired,
    DesiredStateError,
    NodeStatus,
    desired_key,
    status_key,
)
from edge_agent.errors import AgentError, RegistrationError
from edge_agent.registration import ConsulKV
from edge_agent.serving.lifecycle import ModelHost
from edge_agent.serving.protocol import ErrorResult
from edge_agent.settings import AgentSettings

log = logging.getLogger(__name__)

PROGRESS_EVERY_S = 1.0   # status writes while a fetch runs


def _record(settings: AgentSettings) -> Path:
    return Path(settings.store) / ".serving" / settings.node


def remembered(settings: AgentSettings, trust) -> Bundle | None:
    """The bundle this node served last, from its store, if it was started with the same
    ``--bundle`` seed as now (None: none, another seed, or no longer valid)."""
    try:
        record = json.loads(_record(settings).read_text())
        if record.get("seed") != settings.bundle:
            return None
        bundle = find_in_store(settings.store, str(record["digest"]))
        return open_trusted(bundle.path, trust) if bundle is not None else None
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, AgentError) as exc:
        log.warning("the bundle this node served last is not usable", extra={"error": str(exc)})
        return None


def remember(settings: AgentSettings, bundle: Bundle) -> None:
    path = _record(settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"digest": bundle.digest, "seed": settings.bundle}))
    tmp.replace(path)


class DesiredStateFollower:
    """Keeps one agent on its node's desired bundle; started with the app, stopped with it."""

    def __init__(self, settings: AgentSettings, host: ModelHost, kv: ConsulKV,
                 on_swap: Callable[[Bundle], Awaitable[None]], *, max_backoff: float = 10.0):
        self.settings = settings
        self.host = host
        self.kv = kv
        self.on_swap = on_swap
        self.max_backoff = max_backoff
        self.status = NodeStatus(serving=host.model.bundle.digest)
        self._applied: Desired | None = None
        self._task: asyncio.Task | None = None
        self._last_write = 0.0

    async def start(self) -> None:
        remember(self.settings, self.host.model.bundle)
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="desired-state-follower")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        await self.kv.close()

    async def _run(self) -> None:
        index, backoff, reported = None, 0.0, False
        while True:
            try:
                if not reported:  # the node's state, once the registry answers
                    await self._report()
                    reported = True
                new_index, raw = await self.kv.get(desired_key(self.settings.node), index)
                backoff = 0.0
            except RegistrationError as exc:
                backoff = min(self.max_backoff, max(0.5, backoff * 2))
                log.warning("desired state unreadable; serving on",
                            extra={"error": str(exc), "retry_s": round(backoff, 1)})
                await asyncio.sleep(backoff * random.uniform(0.75, 1.0))
                continue
            except Exception:   # a bug must not end following for good
                log.exception("desired-state follower failed; retrying")
                await asyncio.sleep(self.max_backoff)
                continue
            # Consul: an index that goes backwards (a registry restarted) starts over
            index = new_index if index is None or new_index >= index else None
            if raw is None:
                continue
            try:
                desired = Desired.from_json(raw)
            except DesiredStateError as exc:
                log.warning("desired state ignored", extra={"error": str(exc)})
                continue
            if desired != self._applied:
                await self._apply(desired)

    async def _apply(self, desired: Desired) -> None:
        serving = self.host.model.bundle
        if serving.digest.startswith(desired.digest):
            self._applied = desired
            await self._report(state="serving", rollout=desired.rollout, error=None)
            return
        bundle = await self._fetch(desired)
        if bundle is None:
            return
        self._applied = desired
        if not desired.switch:
            await self._report(state="ready", ready=bundle.digest, rollout=desired.rollout)
            return
        result = await self.host.swap(str(bundle.path))
        if isinstance(result, ErrorResult):   # tried once: a new desired state tries again
            await self._report(state="failed", error=result.message, rollout=desired.rollout)
            return
        remember(self.settings, result)
        await self.on_swap(result)
        log.info("desired bundle served", extra={"digest": result.digest12,
                                                 "last_good": serving.digest12})
        await self._report(serving=result.digest, last_good=serving.digest, ready=None,
                           state="serving", progress=1.0, error=None, rollout=desired.rollout)

    async def _fetch(self, desired: Desired) -> Bundle | None:
        """The desired bundle from the store, or downloaded into it; None (reported) when it
        cannot be had. The node serves on meanwhile."""
        store = self.settings.store
        try:
            cached = await asyncio.to_thread(find_in_store, store, desired.digest)
            if cached is not None:
                return await asyncio.to_thread(open_trusted, cached.path, self.host.trust)
            await self._report(state="fetching", progress=0.0, rollout=desired.rollout,
                               error=None)
            loop = asyncio.get_running_loop()
            done: dict[str, tuple[int, int]] = {}

            def progress(name: str, got: int, total: int) -> None:   # a worker thread
                done[name] = (got, total)
                if time.monotonic() - self._last_write >= PROGRESS_EVERY_S:
                    self._last_write = time.monotonic()
                    got_all = sum(g for g, _ in done.values())
                    total_all = sum(t for _, t in done.values()) or 1
                    asyncio.run_coroutine_threadsafe(
                        self._report(progress=round(got_all / total_all, 3)), loop)

            bundle = await asyncio.to_thread(fetch_bundle, desired.url, store,
                                             progress=progress, trust=self.host.trust)
            if not bundle.digest.startswith(desired.digest):
                raise AgentError(f"{desired.url} holds bundle {bundle.digest12}, not "
                                 f"{desired.digest[:12]}")
            return bundle
        except AgentError as exc:
            log.warning("desired bundle refused", extra={"url": desired.url, "error": str(exc)})
            self._applied = desired   # a new desired state (or a restart) tries again
            await self._report(state="failed", error=str(exc), rollout=desired.rollout)
            return None

    async def _report(self, **changes) -> None:
        """Write the node's status; a registry that does not answer loses this write only."""
        self.status = NodeStatus(**{**self.status.__dict__, **changes, "at": time.time()})
        try:
            await self.kv.put(status_key(self.settings.node), self.status.to_json())
        except RegistrationError as exc:
            log.warning("node status not written", extra={"error": str(exc)})
