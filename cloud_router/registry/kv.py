"""Consul's KV store, the part the embedded registry serves (api-docs/kv.mdx): entries, their
indexes, the rules for keys, values and query parameters, and the journal records. Pure: no
I/O, no clock, no HTTP (``http`` maps these to routes and status codes).

Semantics follow Consul's (agent/kvs_endpoint.go, agent/consul/kvs_endpoint.go, state/kvs.go):

- An entry is Consul's DirEntry: ``LockIndex`` (always 0: no sessions here), ``Key``,
  ``Flags`` (an unsigned 64-bit number the client owns), ``Value`` (base64, ``null`` for an
  empty value), ``CreateIndex``, ``ModifyIndex``. Every write takes the registry's next
  index; a PUT always writes (a new ModifyIndex even for the same value).
- ``cas=0`` writes only a key that does not exist; ``cas=N`` only one whose ModifyIndex is N.
  A DELETE with ``cas`` deletes only at that ModifyIndex (so ``cas=0`` never deletes) and
  answers true for a key that is already gone.
- The index a read answers with (``X-Consul-Index``): an existing key's ModifyIndex; for a
  missing key, and for every ``recurse`` / ``keys`` listing, the KV store's own index (that
  of its last write, deletes included). Consul answers a listing with the highest index
  under its prefix; the store-wide index is never lower and never goes backwards (no
  tombstones needed), so a blocking listing returns on a write to any key, under its prefix
  or not — never on a service or check change. A blocking read of one key returns only
  when that key changes (or the query's ``wait`` runs out).
- Keys: not empty (except for a listing), not starting with ``/`` (Consul's clients refuse
  it), only printable characters (Consul's HTTP server refuses others with 400), and no
  empty, ``.`` or ``..`` path segment (Consul's Go server cleans such paths, so the key
  could never be reached there). Values: at most 512 KiB (Consul's ``kv_max_value_size``),
  413 with Consul's text beyond.
"""

from __future__ import annotations

import base64
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from cloud_router.errors import InvalidRequest, ValueTooLarge

Record = dict  # a journal record (see ``KV_OPS``)
KV_OPS = ("kv_set", "kv_delete", "kv_delete_tree", "kv_index")
MAX_VALUE_SIZE = 512 * 1024   # Consul's kv_max_value_size default (raft's suggested maximum)
MAX_UINT64 = 2**64 - 1
# ?raw: Consul's headers, so that a browser never runs a stored value (CVE-2020-25864).
RAW_HEADERS = {"Content-Type": "text/plain", "X-Content-Type-Options": "nosniff",
               "Content-Security-Policy": "sandbox"}


@dataclass(frozen=True)
class Entry:
    key: str
    value: bytes | None
    flags: int
    create_index: int
    modify_index: int


def entry_json(entry: Entry) -> dict:
    """Consul's DirEntry JSON, fields in Consul's order."""
    value = base64.b64encode(entry.value).decode() if entry.value is not None else None
    return {"LockIndex": 0, "Key": entry.key, "Flags": entry.flags, "Value": value,
            "CreateIndex": entry.create_index, "ModifyIndex": entry.modify_index}


def key_names(entries: Iterable[Entry], prefix: str, separator: str) -> list[str]:
    """``?keys``: the names, each cut after the first ``separator`` past ``prefix`` (one
    name per "folder"), in key order."""
    names: dict[str, None] = {}
    for e in entries:
        cut = e.key.find(separator, len(prefix)) if separator else -1
        names[e.key if cut < 0 else e.key[:cut + len(separator)]] = None
    return list(names)


# ---- request rules ----------------------------------------------------------------------------

def check_key(key: str, *, required: bool) -> None:
    """InvalidRequest (400) for a key Consul cannot serve (module docstring)."""
    if not key:
        if required:
            raise InvalidRequest("Missing key name")
        return
    if key.startswith("/"):
        raise InvalidRequest(f"Invalid key {key!r}: a key must not begin with a '/'")
    if not key.isprintable():
        raise InvalidRequest(f"Invalid key {key!r}: it holds a character that is not "
                             "printable (Consul refuses such URLs)")
    segments = key.split("/")
    if any(s in (".", "..") for s in segments) or "" in segments[:-1]:
        raise InvalidRequest(f"Invalid key {key!r}: an empty, '.' or '..' path segment "
                             "cannot be reached over Consul's HTTP API (it cleans such paths)")


def _uint(query: Mapping[str, str], name: str) -> int | None:
    if name not in query:
        return None
    raw = query[name]
    value = int(raw) if raw.isascii() and raw.isdigit() else -1   # Go's ParseUint: digits only
    if not 0 <= value <= MAX_UINT64:
        raise InvalidRequest(f"Invalid ?{name}={raw!r}: expected an unsigned 64-bit integer")
    return value


def _conflicting(query: Mapping[str, str], *names: str) -> None:
    given = [n for n in names if n in query]
    if len(given) > 1:
        raise InvalidRequest("Conflicting flags: " + ", ".join(f"?{n}" for n in given)
                             + " cannot be combined")


@dataclass(frozen=True)
class ReadOptions:
    """GET /v1/kv/:key. Like Consul, a parameter counts when present (``?recurse=false``
    recurses); ``keys`` implies a listing; ``raw`` applies to a single key only."""

    recurse: bool
    keys: bool
    raw: bool
    separator: str

    @property
    def listing(self) -> bool:
        return self.recurse or self.keys


def read_options(key: str, query: Mapping[str, str]) -> ReadOptions:
    # Consul still reads its historic misspelling ``seperator``; the right one wins.
    separator = query.get("separator", query.get("seperator", ""))
    opts = ReadOptions("recurse" in query, "keys" in query, "raw" in query, separator)
    check_key(key, required=not opts.listing)
    return opts


def write_options(key: str, query: Mapping[str, str]) -> tuple[int, int | None]:
    """PUT /v1/kv/:key → (flags, cas or None). Sessions (``acquire``/``release``) are not
    part of this registry: 400 rather than a write that ignores the lock."""
    check_key(key, required=True)
    _conflicting(query, "cas", "acquire", "release")
    if "acquire" in query or "release" in query:
        raise InvalidRequest("?acquire and ?release need Consul's sessions, which edgegen's "
                             "registry does not implement; use ?cas for safe updates")
    return _uint(query, "flags") or 0, _uint(query, "cas")


def delete_options(key: str, query: Mapping[str, str]) -> tuple[bool, int | None]:
    """DELETE /v1/kv/:key → (recurse, cas or None)."""
    _conflicting(query, "recurse", "cas")
    recurse = "recurse" in query
    check_key(key, required=not recurse)
    return recurse, _uint(query, "cas")


def check_size(length: int) -> None:
    """ValueTooLarge (413, Consul's text) for a value over ``MAX_VALUE_SIZE`` bytes."""
    if length > MAX_VALUE_SIZE:
        raise ValueTooLarge(
            f"Request body({length} bytes) too large, max size: {MAX_VALUE_SIZE} bytes. See "
            "https://developer.hashicorp.com/docs/agent/config/config-files#kv_max_value_size.")


# ---- the store --------------------------------------------------------------------------------

def _value_record(value: bytes | None) -> str | None:
    return base64.b64encode(value).decode() if value is not None else None


class KVStore:
    """The entries by key and ``index``, the index of the store's last write (Consul's KV
    table index); writes are given the index they take and return their journal record."""

    def __init__(self) -> None:
        self.entries: dict[str, Entry] = {}
        self.index = 0

    # ---- reads ----------------------------------------------------------------------------

    def get(self, key: str) -> Entry | None:
        return self.entries.get(key)

    def under(self, prefix: str) -> list[Entry]:
        """Every entry whose key starts with ``prefix``, in key order."""
        return [self.entries[k] for k in sorted(self.entries) if k.startswith(prefix)]

    def key_index(self, key: str) -> int:
        """X-Consul-Index of a read of ``key``: its ModifyIndex, else the store's index."""
        entry = self.entries.get(key)
        return entry.modify_index if entry is not None else max(self.index, 1)

    def list_index(self) -> int:
        """X-Consul-Index of a listing (module docstring)."""
        return max(self.index, 1)

    # ---- writes ---------------------------------------------------------------------------

    def put(self, key: str, value: bytes | None, flags: int, cas: int | None,
            index: int) -> Record | None:
        """Set ``key`` at ``index``; None when ``cas`` refuses (nothing changes)."""
        old = self.entries.get(key)
        if cas is not None and cas != (old.modify_index if old is not None else 0):
            return None
        record = {"op": "kv_set", "index": index, "key": key, "flags": flags,
                  "value": _value_record(value),
                  "create_index": old.create_index if old is not None else index}
        self.apply(record)
        return record

    def delete(self, key: str, cas: int | None, index: int) -> tuple[bool, Record | None]:
        """(Consul's answer, the record when something was deleted)."""
        old = self.entries.get(key)
        if old is None:
            return True, None
        if cas is not None and cas != old.modify_index:
            return False, None
        record = {"op": "kv_delete", "index": index, "key": key}
        self.apply(record)
        return True, record

    def delete_tree(self, prefix: str, index: int) -> Record | None:
        if not any(k.startswith(prefix) for k in self.entries):
            return None
        record = {"op": "kv_delete_tree", "index": index, "prefix": prefix}
        self.apply(record)
        return record

    def apply(self, record: Record) -> None:
        """Apply one record (a write above, or a journal replay) with its recorded indexes."""
        op, index = record["op"], int(record["index"])
        if op == "kv_set":
            value = record.get("value")
            self.entries[record["key"]] = Entry(
                record["key"], base64.b64decode(value) if value is not None else None,
                int(record.get("flags", 0)), int(record.get("create_index", index)), index)
        elif op == "kv_delete":
            self.entries.pop(record["key"], None)
        elif op == "kv_delete_tree":
            for k in [k for k in self.entries if k.startswith(record["prefix"])]:
                del self.entries[k]
        elif op != "kv_index":
            raise ValueError(f"not a KV record: {op!r}")
        self.index = max(self.index, index)

    def snapshot(self) -> list[Record]:
        """Records that rebuild the store, indexes included."""
        records: list[Record] = [
            {"op": "kv_set", "index": e.modify_index, "key": e.key, "flags": e.flags,
             "value": _value_record(e.value), "create_index": e.create_index}
            for e in self.entries.values()]
        if self.index:
            records.append({"op": "kv_index", "index": self.index})
        return records
