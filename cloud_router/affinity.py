"""Which endpoint most likely holds a request's prompt prefix in its cache, and what each
endpoint says of its own load. No I/O, no clock.

Prefixes: a chat's prompt grows turn by turn (system prompt, then each exchange), so its
prefix is keyed message by message: key *i* is a hash chained over the model and the first *i*
messages, and holds their length in characters. A completion prompt is keyed by blocks of
``BLOCK_CHARS``. The router remembers, per key, the endpoints it last sent that prefix to, in
a bounded table (least recently used keys go first); for a new request, each endpoint's
longest key found says how much of the prompt its prefix cache most likely still holds, so
how much it would not have to read again.

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
    """Prefix key -> the endpoints last sent that prefix (at most ``holders``, the latest
    first): a prefix sent to several endpoints is cached on all of them, so it is no reason to
    prefer one (a shared system prompt); the part only one holds is (a chat's own history).
    At most ``capacity`` keys; the least recently used go first."""

    def __init__(self, capacity: int = 65_536, holders: int = 4):
        self.capacity = capacity
        self.holders = holders
        self._held: OrderedDict[bytes, tuple[str, ...]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._held)

    def lookup(self, keys: tuple[tuple[bytes, int], ...]) -> dict[str, int]:
        """Endpoint id -> characters of the longest prefix it was sent (longest key first)."""
        found: dict[str, int] = {}
        for key, chars in keys:
            for holder in self._held.get(key, ()):
                found.setdefault(holder, chars)
        return found

    def record(self, keys: tuple[tuple[bytes, int], ...], endpoint_id: str) -> None:
        for key, _chars in keys:
            others = tuple(h for h in self._held.get(key, ()) if h != endpoint_id)
            self._held[key] = (endpoint_id, *others)[: self.holders]
            self._held.move_to_end(key)
        while len(self._held) > self.capacity:
            self._held.popitem(last=False)

    def forget(self, endpoint_id: str) -> None:
        """An endpoint that restarted or left holds nothing any more."""
        for key in [k for k, held in self._held.items() if endpoint_id in held]:
            rest = tuple(h for h in self._held[key] if h != endpoint_id)
            if rest:
                self._held[key] = rest
            else:
                del self._held[key]


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
