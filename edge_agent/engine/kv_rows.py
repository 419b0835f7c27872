"""A sequence's place in the batch engine's shared KV buffer: its row record, the buffer's
memory, moving rows, and which of a row's positions a later prompt may take as they are.

The buffer is ``[2 x layers, rows, kv_heads, capacity, head_dim]``. Active rows are always
``[0, n)``, the engine's ``rows`` list in row order: a finished row is replaced by the last
one, and a decode run takes the rows ``[0, len(decoding))``."""

from __future__ import annotations

import mmap

import numpy as np

from edge_agent.engine.base import SequenceState


class BatchRow:
    """One sequence's place in the batch: its row, the tokens in its cache, its sampler."""

    __slots__ = ("epoch", "index", "length", "rng", "salt")

    def __init__(self, rng: np.random.Generator, salt: str | None):
        self.index = -1       # -1: no row yet
        self.length = 0       # positions of the row's KV that hold this sequence's tokens
        self.rng = rng
        self.salt = salt
        self.epoch = None     # the prefix cache's epoch when placed (or its work queued)


def kv_buffer(shape: tuple[int, ...], dtype) -> np.ndarray:
    """A zeroed array in its own anonymous mapping, without transparent huge pages: with the
    agent's huge pages (edge_agent.hugepages) a KV buffer is zero-filled 2 MB at a time where a
    row is first written (0.55 s for a 1.2k-token prompt's, stalling every stream; 15 ms with
    4 kB pages), and its RSS jumps by megabytes per row instead of growing with its use."""
    size = max(1, int(np.prod(shape))) * np.dtype(dtype).itemsize
    buf = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_NOHUGEPAGE"):  # Linux
        buf.madvise(mmap.MADV_NOHUGEPAGE)
    return np.frombuffer(buf, dtype=dtype).reshape(shape)


def move_row(kv: np.ndarray, rows: list[SequenceState], src: int, dst: int) -> None:
    """Copy row ``src``'s sequence, and the KV it holds, to row ``dst``."""
    seq = rows[src]
    n = seq.data.length
    kv[:, dst, :, :n] = kv[:, src, :, :n]
    rows[dst] = seq
    seq.data.index = dst


def arrange_rows(kv: np.ndarray, rows: list[SequenceState],
                 decoding: list[SequenceState]) -> None:
    """Put the sequences to decode in rows ``[0, len(decoding))``, in that order: a row
    that is not decoded (its prompt is being read) is swapped out through a copy."""
    for b, seq in enumerate(decoding):
        i = seq.data.index
        if i == b:
            continue
        other = rows[b]
        n = other.data.length
        scratch = kv[:, b, :, :n].copy()
        move_row(kv, rows, i, b)
        kv[:, i, :, :n] = scratch
        rows[i] = other
        other.data.index = i


def prefilled(seq: SequenceState) -> list[int]:
    """The tokens whose KV in ``seq``'s row prefill runs (or prefix cache copies) computed:
    its prompt as far as read, never the reply that decode runs added after it (the two
    kernels' values differ; batch.py's ``_place`` says why that matters)."""
    return seq.prompt_ids[:min(seq.data.length, len(seq.prompt_ids))]


def short_and_unread(seq: SequenceState, limit: int) -> bool:
    """Whether ``seq``'s prompt is placed but not begun (its row holds only its cache hit)
    and has at most ``limit`` tokens left to read."""
    left = len(seq.prompt_ids) - seq.data.length
    return seq.data.length == seq.cached_tokens and left <= limit


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens ``a`` and ``b`` share."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    return next(i for i in range(n) if a[i] != b[i])
