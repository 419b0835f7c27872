"""The prefix (prompt) cache: KV state of token prefixes, shared by every request of an engine.

Chat traffic re-sends the same system prompt and a growing history with every turn; reading
those tokens again is most of the time to the first token. The cache keeps the KV of whole
blocks of ``block_tokens`` tokens, as vLLM's automatic prefix caching does:

- A block is named by a chain hash: SHA-256 of its parent block's name, and its tokens. The
  first block's parent is the tenant's salt, so a block is only ever found by a request that
  starts with exactly the same tokens *and* the same salt (tenants never share entries, and a
  crafted prompt cannot collide with another's as it could with Python's ``hash``).
- ``lookup`` walks a prompt's blocks from the start and returns the KV of the longest cached
  run; ``store`` copies in the blocks of a sequence not cached yet.
- Blocks are evicted least recently used first under a byte budget. Every access touches a
  chain from its last block back to its first, so a block is always more recent than the
  blocks after it: eviction takes the tail of a chain before its head, and a cached block's
  parent is always cached too.

The cache holds copies: a sequence that used a block keeps its own KV, so clearing the cache
or evicting a block while requests run changes nothing for them. It is owned by one engine
(one bundle): a hot swap loads a new engine with an empty cache, so the old model's KV can
never serve the new one. Not thread-safe; the scheduler steps the engine from one thread.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

BLOCK_TOKENS = 16


@dataclass
class CacheStats:
    """Counters since the engine was loaded (the agent's metrics read them)."""

    lookups: int = 0          # requests that looked up their prompt
    hits: int = 0             # ... and found at least one block
    hit_tokens: int = 0       # prompt tokens served from the cache
    stored_blocks: int = 0
    evicted_blocks: int = 0


def _root(salt: str | None) -> bytes:
    return hashlib.sha256(b"edgegen-prefix\0" + (salt or "").encode("utf-8", "surrogatepass")
                          ).digest()


def block_names(tokens: Sequence[int], salt: str | None, block_tokens: int) -> list[bytes]:
    """The chain-hash name of every whole block of ``tokens``."""
    names, parent = [], _root(salt)
    for start in range(0, len(tokens) - block_tokens + 1, block_tokens):
        block = np.asarray(tokens[start:start + block_tokens], dtype=np.int64).tobytes()
        parent = hashlib.sha256(parent + block).digest()
        names.append(parent)
    return names


class PrefixCache:
    """KV blocks of token prefixes under ``budget_bytes``, least recently used evicted first."""

    def __init__(self, budget_bytes: int, block_tokens: int = BLOCK_TOKENS):
        if block_tokens < 1:
            raise ValueError("block_tokens must be at least 1")
        self.budget_bytes = max(0, int(budget_bytes))
        self.block_tokens = block_tokens
        self._blocks: OrderedDict[bytes, np.ndarray] = OrderedDict()  # oldest first
        self.bytes = 0
        self.stats = CacheStats()
        self.epoch = 0        # bumped by every clear: work queued before it is stale
        self._reset = False

    def request_reset(self) -> None:
        """Forget every entry before the cache is next used: callable from any thread, while
        the lookups and stores stay on the engine's (no lock on the step path)."""
        self._reset = True

    @property
    def enabled(self) -> bool:
        return self.budget_bytes > 0

    def __len__(self) -> int:
        return len(self._blocks)

    def lookup(self, tokens: Sequence[int], salt: str | None) -> list[np.ndarray]:
        """The KV blocks of the longest cached prefix of ``tokens`` (whole blocks), in order."""
        if not self.enabled:
            return []
        self.apply_reset()
        self.stats.lookups += 1
        found = []
        for name in block_names(tokens, salt, self.block_tokens):
            if name not in self._blocks:
                break
            found.append(name)
        self._touch(found)
        if found:
            self.stats.hits += 1
            self.stats.hit_tokens += len(found) * self.block_tokens
        return [self._blocks[name] for name in found]

    def store(self, tokens: Sequence[int], salt: str | None,
              read: Callable[[int, int], np.ndarray]) -> int:
        """Cache every whole block of ``tokens`` not cached yet; ``read(start, end)`` returns a
        copy of the KV of positions [start, end). Returns how many blocks were added.

        Only as many leading blocks as the budget can hold are considered, so a prompt
        larger than the whole cache keeps its head rather than evicting it for its tail."""
        if not self.enabled:
            return 0
        self.apply_reset()
        names = block_names(tokens, salt, self.block_tokens)
        added, kept = 0, []
        for i, name in enumerate(names):
            if name in self._blocks:
                kept.append(name)
                self._blocks.move_to_end(name)  # keep it from being evicted for its successors
                continue
            start = i * self.block_tokens
            kv = read(start, start + self.block_tokens)
            if kv.nbytes * (len(kept) + 1) > self.budget_bytes:
                break  # this chain alone would overflow the budget
            self._evict(self.budget_bytes - kv.nbytes, protect=set(kept))
            self._blocks[name] = kv
            self.bytes += kv.nbytes
            kept.append(name)
            added += 1
        self._touch(kept)
        self.stats.stored_blocks += added
        return added

    def clear(self) -> None:
        self._reset = False
        self._blocks.clear()
        self.bytes = 0
        self.epoch += 1

    def apply_reset(self) -> None:
        """Carry out a ``request_reset`` now (on the engine's thread)."""
        if self._reset:
            self.clear()

    def _touch(self, chain: list[bytes]) -> None:
        for name in reversed(chain):  # last block first: a head is always more recent than its tail
            self._blocks.move_to_end(name)

    def _evict(self, target: int, protect: set[bytes]) -> None:
        """Drop least recently used blocks until at most ``target`` bytes are held."""
        if self.bytes <= target:
            return
        for name in list(self._blocks):
            if self.bytes <= target:
                return
            if name in protect:
                continue
            self.bytes -= self._blocks.pop(name).nbytes
            self.stats.evicted_blocks += 1
