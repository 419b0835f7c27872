"""Which endpoint most likely holds a request's prompt prefix in its cache, and what each
endpoint says of its own load. No I/O, no clock.

Prefixes: a chat's prompt grows turn by turn (system prompt, then each exchange), so its
prefix is keyed message by message: key *i* is a hash chained over the model and the first *i*
messages, and holds their length in characters. A completion prompt is keyed by blocks of
``BLOCK_CHARS``. The router remembers, per key, the endpoint it last sent that prefix to, in
a bounded table (least recently used keys go first); for a new request the longest key found
names the endpoint whose prefix cache most likely still holds it, and how much of the prompt
it would not have to read again.

Load: agents answer ORCA's ``endpoint-load-metrics`` header (TEXT format, the named metrics of
the Gateway API Inference Extension's model-server protocol) when asked; ``parse_load_report``
refuses a report that cannot be true (negative, not finite, a cache fill above 1, absurd
counts) rather than let it steer placement.
"""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

BLOCK_CHARS = 256
MAX_KEYS_PER_REQUEST = 64      # the longest prefixes of a very long conversation
MAX_REPORTED_REQUESTS = 100_000
LOAD_FORMAT_HEADER = "endpoint-load-metrics-format"
LOAD_HEADER = "endpoint-load-metrics"


def prefix_keys(path: str, payload: Any) -> tuple[tuple[bytes, int], ...]:
    """(key, characters) for each leading part of the request's prompt, longest first."""
    if not isinstance(payload, dict):
        return ()
    h = hashlib.blake2b(str(payload.get("model")).encode(), digest_size=16)
    keys: list[tuple[bytes, int]] = []
    chars = 0
    messages = payload.get("messages")
    if path.endswith("/chat/completions") and isinstance(messages, list):
        for message in messages:
            text = _message_text(message)
            h.update(text.encode("utf-8", "surrogatepass"))
            h.update(b"\x00")
            chars += len(text)
            keys.append((h.copy().digest(), chars))
    elif isinstance(payload.get("prompt"), str):
        prompt = payload["prompt"]
        for start in range(0, len(prompt) - BLOCK_CHARS + 1, BLOCK_CHARS):
            h.update(prompt[start:start + BLOCK_CHARS].encode("utf-8", "surrogatepass"))
            keys.append((h.copy().digest(), start + BLOCK_CHARS))
    return tuple(reversed(keys[-MAX_KEYS_PER_REQUEST:]))


def _message_text(message: Any) -> str:
    if not isinstance(message, dict):
        return repr(message)
    content = message.get("content")
    if isinstance(content, list):   # content parts: their text
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return f"{message.get('role')}\x00{content if isinstance(content, str) else ''}"


class AffinityTable:
    """Prefix key -> the endpoint last sent that prefix; at most ``capacity`` keys."""

    def __init__(self, capacity: int = 65_536):
        self.capacity = capacity
        self._owner: OrderedDict[bytes, str] = OrderedDict()

    def __len__(self) -> int:
        return len(self._owner)

    def lookup(self, keys: tuple[tuple[bytes, int], ...]) -> dict[str, int]:
        """Endpoint id -> characters of the longest prefix it was sent (longest key first)."""
        found: dict[str, int] = {}
        for key, chars in keys:
            owner = self._owner.get(key)
            if owner is not None and owner not in found:
                found[owner] = chars
        return found

    def record(self, keys: tuple[tuple[bytes, int], ...], endpoint_id: str) -> None:
        for key, _chars in keys:
            self._owner[key] = endpoint_id
            self._owner.move_to_end(key)
        while len(self._owner) > self.capacity:
            self._owner.popitem(last=False)

    def forget(self, endpoint_id: str) -> None:
        """An endpoint that restarted or left holds nothing any more."""
        for key in [k for k, owner in self._owner.items() if owner == endpoint_id]:
            del self._owner[key]


@dataclass(frozen=True)
class LoadReport:
    waiting: int
    running: int
    cache_usage: float


def parse_load_report(header: str) -> LoadReport:
    """An ORCA TEXT report: ``TEXT named_metrics.num_requests_waiting=2, ...``. ValueError
    for anything malformed or impossible."""
    fmt, _, body = header.strip().partition(" ")
    if fmt.upper() != "TEXT":
        raise ValueError(f"not a TEXT load report: {header[:40]!r}")
    values: dict[str, float] = {}
    for item in body.split(","):
        name, sep, value = item.strip().partition("=")
        if not sep:
            raise ValueError(f"not name=value: {item[:40]!r}")
        values[name.strip().removeprefix("named_metrics.")] = float(value)
    waiting = values.get("num_requests_waiting", 0.0)
    running = values.get("num_requests_running", 0.0)
    usage = values.get("kv_cache_usage_perc", 0.0)
    for count in (waiting, running):
        if not (math.isfinite(count) and 0 <= count <= MAX_REPORTED_REQUESTS
                and count == int(count)):
            raise ValueError(f"impossible request count {count}")
    if not (math.isfinite(usage) and 0.0 <= usage <= 1.0):
        raise ValueError(f"impossible cache fill {usage}")
    return LoadReport(int(waiting), int(running), usage)
