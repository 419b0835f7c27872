"""The registry's state machine: services, their checks, and the index that only grows.

Pure: no clock, no I/O, no asyncio. Every method that depends on time takes ``now``
(monotonic seconds); every change bumps ``index`` by one and is returned as a journal
record, which the runtime appends to the write-ahead file and uses to wake blocking
queries. Replaying the records with ``apply`` rebuilds the same state.

Semantics follow a Consul agent: a check starts ``critical`` unless its definition says
otherwise; re-registering a service keeps the status of checks whose ID it reuses (so an
update does not flap the service); a TTL check not refreshed within its TTL turns
critical; a service whose check stays critical longer than its
DeregisterCriticalServiceAfter is removed.

The KV store (``kv``) shares the index: each KV write takes the next one and is journalled
like any other change.
"""

from __future__ import annotations

from dataclasses import dataclass

from cloud_router.errors import InvalidRequest, NotFound
from cloud_router.registry.definitions import (
    STATUSES,
    CheckDefinition,
    ServiceDefinition,
    parse_service,
)
from cloud_router.registry.kv import KV_OPS, KVStore

Record = dict  # a journal record: {"op": "register"|"deregister"|"status"|"kv_...", "index": n}


@dataclass
class CheckState:
    definition: CheckDefinition
    status: str
    output: str
    create_index: int
    modify_index: int
    ttl_deadline: float | None = None     # TTL checks: when the check turns critical
    critical_since: float | None = None   # for DeregisterCriticalServiceAfter


@dataclass
class ServiceState:
    definition: ServiceDefinition
    body: dict                # the request body as received: what the journal replays
    create_index: int
    modify_index: int


class RegistryState:
    """Services and checks of one registry; ``index`` is Consul's X-Consul-Index."""

    def __init__(self, *, node: str = "edgegen-registry", datacenter: str = "dc1",
                 min_deregister_after: float = 60.0):
        self.node = node
        self.datacenter = datacenter
        # Consul's reaper refuses values below one minute; tests of the embedded registry
        # may lower the floor so that deregister-after is observable in seconds.
        self.min_deregister_after = min_deregister_after
        self.index = 1
        self.services: dict[str, ServiceState] = {}
        self.checks: dict[str, CheckState] = {}
        self.kv = KVStore()

    # ---- writes -------------------------------------------------------------------------

    def register(self, body: dict, now: float) -> Record:
        """PUT /v1/agent/service/register. Raises InvalidRequest for a bad body."""
        definition = parse_service(body)
        for c in definition.checks:
            owner = self.checks.get(c.check_id)
            if owner is not None and owner.definition.service_id != definition.id:
                raise InvalidRequest(
                    f"Check ID {c.check_id!r} already belongs to service "
                    f"{owner.definition.service_id!r}"
                )
        self.index += 1
        old = self.services.get(definition.id)
        self.services[definition.id] = ServiceState(
            definition=definition, body=body,
            create_index=old.create_index if old else self.index, modify_index=self.index,
        )
        kept = {c.check_id for c in definition.checks}
        for cid in [cid for cid, c in self.checks.items()
                    if c.definition.service_id == definition.id and cid not in kept]:
            del self.checks[cid]
        for c in definition.checks:
            prev = self.checks.get(c.check_id)
            status = prev.status if prev else c.status
            output = prev.output if prev else ""
            self.checks[c.check_id] = CheckState(
                definition=c, status=status, output=output,
                create_index=prev.create_index if prev else self.index, modify_index=self.index,
                ttl_deadline=(now + c.ttl) if c.kind == "ttl" else None,
                critical_since=(prev.critical_since if prev else now)
                if status == "critical" else None,
            )
        return {"op": "register", "index": self.index, "body": body}

    def deregister(self, service_id: str) -> Record | None:
        """PUT /v1/agent/service/deregister/:id. Unknown IDs are a no-op, as in Consul."""
        if service_id not in self.services:
            return None
        self.index += 1
        del self.services[service_id]
        for cid in [cid for cid, c in self.checks.items()
                    if c.definition.service_id == service_id]:
            del self.checks[cid]
        return {"op": "deregister", "index": self.index, "service": service_id}

    def update_ttl(self, check_id: str, status: str, output: str, now: float) -> Record | None:
        """PUT /v1/agent/check/pass|warn|fail|update/:id: set the status, reset the TTL clock."""
        check = self.checks.get(check_id)
        if check is None:
            raise NotFound(f"Unknown check ID {check_id!r}. Ensure that the check ID is passed, "
                           "not the check name.")
        if status not in STATUSES:
            raise InvalidRequest(f"Invalid check status: {status!r}")
        if check.definition.kind != "ttl":
            raise InvalidRequest(f"CheckID {check_id!r} does not have associated TTL")
        check.ttl_deadline = now + check.definition.ttl
        return self.set_status(check_id, status, output, now)

    def set_status(self, check_id: str, status: str, output: str, now: float) -> Record | None:
        """A check result. Only a status change bumps the index: a steady check that
        rewrites its output every interval must not wake every watcher (Consul batches
        output-only changes the same way)."""
        check = self.checks.get(check_id)
        if check is None:
            return None
        check.output = output
        if check.status == status:
            return None
        self.index += 1
        check.status = status
        check.modify_index = self.index
        check.critical_since = now if status == "critical" else None
        return {"op": "status", "index": self.index, "check": check_id, "status": status,
                "output": output}

    def tick(self, now: float) -> list[Record]:
        """Expire TTL checks and reap services critical past DeregisterCriticalServiceAfter."""
        records: list[Record] = []
        for cid, check in list(self.checks.items()):
            if check.ttl_deadline is not None and now >= check.ttl_deadline \
                    and check.status != "critical":
                rec = self.set_status(cid, "critical", "TTL expired", now)
                if rec:
                    records.append(rec)
        reap = set()
        for check in self.checks.values():
            after = check.definition.deregister_after
            if after > 0 and check.critical_since is not None and check.status == "critical":
                if now - check.critical_since >= max(after, self.min_deregister_after):
                    reap.add(check.definition.service_id)
        for sid in sorted(reap):
            rec = self.deregister(sid)
            if rec:
                records.append(rec)
        return records

    def kv_put(self, key: str, value: bytes | None, flags: int = 0,
               cas: int | None = None) -> Record | None:
        """PUT /v1/kv/:key (``kv.check_key`` already passed); None when ``cas`` refuses."""
        return self._took(self.kv.put(key, value, flags, cas, self.index + 1))

    def kv_delete(self, key: str, *, recurse: bool = False,
                  cas: int | None = None) -> tuple[bool, Record | None]:
        """DELETE /v1/kv/:key: (Consul's true/false, the record when something changed)."""
        if recurse:
            return True, self._took(self.kv.delete_tree(key, self.index + 1))
        ok, record = self.kv.delete(key, cas, self.index + 1)
        return ok, self._took(record)

    def _took(self, record: Record | None) -> Record | None:
        if record is not None:
            self.index = record["index"]
        return record

    def apply(self, record: Record, now: float) -> None:
        """Replay one journal record (restart with a data dir); keeps the recorded index."""
        op = record.get("op")
        if op == "register":
            self.register(record["body"], now)
        elif op == "deregister":
            self.deregister(record["service"])
        elif op == "status":
            check = self.checks.get(record["check"])
            if check is not None:
                self.set_status(record["check"], record["status"], record.get("output", ""),
                                now)
        elif op in KV_OPS:
            self.kv.apply(record)
        self.index = max(self.index, int(record.get("index", self.index)))

    def snapshot(self) -> list[Record]:
        """Records that rebuild the current state: what compaction writes."""
        records: list[Record] = []
        for s in self.services.values():
            records.append({"op": "register", "index": s.modify_index, "body": s.body})
        for cid, c in self.checks.items():
            if c.status != c.definition.status:
                records.append({"op": "status", "index": c.modify_index, "check": cid,
                                "status": c.status, "output": c.output})
        records.extend(self.kv.snapshot())
        records.append({"op": "index", "index": self.index})
        return records

    # ---- reads --------------------------------------------------------------------------

    def service_checks(self, service_id: str) -> list[CheckState]:
        return [c for c in self.checks.values() if c.definition.service_id == service_id]

    def instances(self, name: str) -> list[ServiceState]:
        return [s for s in self.services.values() if s.definition.name == name]

    def node_of(self, service: ServiceState) -> str:
        """The catalog node of a service: its Meta.node when given (each edgegen agent is a
        node of its own), else the registry's own node."""
        return service.definition.meta.get("node") or self.node
