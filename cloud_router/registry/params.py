"""The query parameters Consul's read endpoints share, parsed from a plain mapping (no HTTP
here): a blocking query's ``index`` and ``wait`` (api-docs/features/blocking.mdx), and
boolean flags such as ``?passing``. Bad values are InvalidRequest (400)."""

from __future__ import annotations

from collections.abc import Mapping

from cloud_router.errors import InvalidRequest
from cloud_router.registry.definitions import parse_duration

DEFAULT_WAIT = 300.0   # features/blocking.mdx: 5 minutes when not set
MAX_WAIT = 600.0       # ... and at most 10 minutes


def blocking(query: Mapping[str, str]) -> tuple[int, float]:
    """(index, wait seconds): index 0 means "do not block"."""
    raw_index = query.get("index")
    index = 0
    if raw_index not in (None, ""):
        try:
            index = int(raw_index)
        except ValueError:
            raise InvalidRequest(f"Invalid index: {raw_index!r}") from None
        if index < 0:
            raise InvalidRequest(f"Invalid index: {raw_index!r}")
    raw_wait = query.get("wait")
    wait = DEFAULT_WAIT
    if raw_wait not in (None, ""):
        try:
            wait = parse_duration(raw_wait, "wait")
        except InvalidRequest:
            raise InvalidRequest(f"Invalid wait time: {raw_wait!r}") from None
        if wait <= 0:
            wait = DEFAULT_WAIT
    wait = min(wait, MAX_WAIT)
    return index, wait


def flag(query: Mapping[str, str], name: str) -> bool:
    if name not in query:
        return False
    value = query[name].lower()
    if value in ("", "1", "true", "t", "yes"):
        return True
    if value in ("0", "false", "f", "no"):
        return False
    raise InvalidRequest(f"Invalid value for ?{name}: {value!r}")
