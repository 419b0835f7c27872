"""The live registry: the state machine plus its clock, journal, check runner and wake-ups
(services, checks and the KV store alike).

Every write goes through ``_commit``: the journal records are appended before the caller
answers, then every blocking query waiting on the index is woken at once (one
``asyncio.Event`` per generation, replaced on each change).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Callable

from cloud_router.registry.checks import http_probe, new_client
from cloud_router.registry.definitions import CheckDefinition
from cloud_router.registry.journal import Journal
from cloud_router.registry.state import Record, RegistryState

logger = logging.getLogger(__name__)
COMPACT_AFTER = 10_000  # journal records appended before the file is rewritten as a snapshot


class Registry:
    def __init__(self, data_dir: str | os.PathLike | None = None, *,
                 min_deregister_after: float = 60.0, tick_interval: float = 0.25,
                 clock: Callable[[], float] = time.monotonic):
        self.state = RegistryState(min_deregister_after=min_deregister_after)
        self.journal = Journal(data_dir) if data_dir else None
        self.tick_interval = tick_interval
        self.clock = clock
        self._changed = asyncio.Event()
        self._check_tasks: dict[str, tuple[CheckDefinition, asyncio.Task]] = {}
        self._reaper: asyncio.Task | None = None
        self._client = None
        self._appended = 0

    async def start(self) -> None:
        """Replay and compact the journal, then start the reaper and the HTTP checks."""
        self._changed = asyncio.Event()
        if self.journal is not None:
            now = self.clock()
            records = self.journal.read()
            for rec in records:
                try:
                    self.state.apply(rec, now)
                except Exception as exc:  # noqa: BLE001 - one bad record must not lose the rest
                    logger.warning("skipping a journal record that no longer applies",
                                   extra={"op": rec.get("op"), "error": str(exc)})
            self.journal.rewrite(self.state.snapshot())
            logger.info("registry state restored", extra={
                "services": len(self.state.services), "keys": len(self.state.kv.entries),
                "index": self.state.index,
                "records": len(records)})
        self._client = new_client()
        self._reaper = asyncio.create_task(self._reap_loop(), name="registry-reaper")
        self._sync_checks()

    async def stop(self) -> None:
        tasks = [t for _, t in self._check_tasks.values()]
        if self._reaper:
            tasks.append(self._reaper)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._check_tasks.clear()
        if self._client is not None:
            await self._client.aclose()
        if self.journal is not None:
            self.journal.close()

    # ---- writes -------------------------------------------------------------------------

    def register(self, body: dict) -> None:
        self._commit([self.state.register(body, self.clock())])

    def deregister(self, service_id: str) -> None:
        rec = self.state.deregister(service_id)
        self._commit([rec] if rec else [])

    def update_ttl(self, check_id: str, status: str, output: str) -> None:
        rec = self.state.update_ttl(check_id, status, output, self.clock())
        self._commit([rec] if rec else [])

    def kv_put(self, key: str, value: bytes | None, flags: int = 0,
               cas: int | None = None) -> bool:
        """PUT /v1/kv/:key; False when ``cas`` refused it."""
        rec = self.state.kv_put(key, value, flags, cas)
        self._commit([rec] if rec else [])
        return rec is not None

    def kv_delete(self, key: str, *, recurse: bool = False, cas: int | None = None) -> bool:
        """DELETE /v1/kv/:key; False when ``cas`` refused it."""
        ok, rec = self.state.kv_delete(key, recurse=recurse, cas=cas)
        self._commit([rec] if rec else [])
        return ok

    def _commit(self, records: list[Record]) -> None:
        if not records:
            return
        if self.journal is not None:
            for rec in records:
                self.journal.append(rec)
            self._appended += len(records)
            if self._appended >= COMPACT_AFTER:   # flapping checks must not grow it forever
                self.journal.rewrite(self.state.snapshot())
                self._appended = 0
        old, self._changed = self._changed, asyncio.Event()
        old.set()
        self._sync_checks()

    # ---- blocking queries ---------------------------------------------------------------

    async def wait_past(self, index: int, timeout: float) -> None:
        """Return once ``state.index > index`` or after ``timeout`` seconds."""
        await self.wait_until(lambda: self.state.index > index, timeout)

    async def wait_until(self, ready: Callable[[], bool], timeout: float) -> None:
        """Return once ``ready()`` holds or after ``timeout`` seconds. ``ready`` is asked
        again after every change only, so a query whose own index lags the registry's (a KV
        key) sleeps until a change moves it, never spins."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not ready():
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            event = self._changed
            try:
                await asyncio.wait_for(event.wait(), remaining)
            except TimeoutError:
                return

    # ---- checks and reaping -------------------------------------------------------------

    def _sync_checks(self) -> None:
        """One task per HTTP check in the state; restart a task whose definition changed."""
        if self._client is None:
            return
        wanted = {cid: c.definition for cid, c in self.state.checks.items()
                  if c.definition.kind == "http"}
        for cid, (definition, task) in list(self._check_tasks.items()):
            if wanted.get(cid) != definition:
                task.cancel()
                del self._check_tasks[cid]
        for cid, definition in wanted.items():
            if cid not in self._check_tasks:
                task = asyncio.create_task(self._run_http_check(cid, definition),
                                           name=f"check-{cid}")
                self._check_tasks[cid] = (definition, task)

    async def _run_http_check(self, check_id: str, definition: CheckDefinition) -> None:
        while True:
            status, output = await http_probe(self._client, definition)
            if self.state.checks.get(check_id) is None:
                return
            rec = self.state.set_status(check_id, status, output, self.clock())
            if rec:
                logger.info("check changed", extra={"check": check_id, "status": status})
                self._commit([rec])
            await asyncio.sleep(definition.interval)

    async def _reap_loop(self) -> None:
        while True:
            await asyncio.sleep(self.tick_interval)
            records = self.state.tick(self.clock())
            for rec in records:
                if rec["op"] == "deregister":
                    logger.info("deregistered a service critical for too long",
                                extra={"service": rec["service"]})
            self._commit(records)
