"""Token ids → text, incrementally, with stop strings; never emits broken UTF-8.

Byte-level BPE splits a multi-byte character across tokens; decoding such a prefix yields
U+FFFD. Like vLLM, we decode a small window of recent tokens and only release text once it
no longer ends in U+FFFD. Text that could be the start of a stop string is held back until
it is known not to be one, so a stop string is never emitted.
"""

from __future__ import annotations

from tokenizers import Tokenizer


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Tokenizer, stop: tuple[str, ...] = ()):
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.ids: list[int] = []
        self.prefix_offset = 0      # start of the window decoded for context
        self.read_offset = 0        # tokens before this have been turned into text
        self.pending = ""          # decoded text not yet released (stop-string lookahead)
        self.stopped = False

    def add(self, token_id: int) -> str:
        """Text released by one more token ('' while held back). After a stop string, ''."""
        if self.stopped:
            return ""
        self.ids.append(token_id)
        prefix = self.tokenizer.decode(self.ids[self.prefix_offset:self.read_offset],
                                       skip_special_tokens=True)
        full = self.tokenizer.decode(self.ids[self.prefix_offset:], skip_special_tokens=True)
        if full.endswith("\ufffd") or len(full) < len(prefix) or not full.startswith(prefix):
            return ""  # mid-character: wait for the next token
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.ids)
        return self._release(full[len(prefix):])

    def flush(self) -> str:
        """The held-back text at the end of the sequence (no stop string can complete now)."""
        if self.stopped:
            return ""
        tail = self.tokenizer.decode(self.ids[self.prefix_offset:], skip_special_tokens=True)
        prefix = self.tokenizer.decode(self.ids[self.prefix_offset:self.read_offset],
                                       skip_special_tokens=True)
        extra = tail[len(prefix):] if tail.startswith(prefix) else ""
        out, self.pending = self.pending + extra.rstrip("\ufffd"), ""
        return out

    def _release(self, new: str) -> str:
        text = self.pending + new
        if not self.stop:
            self.pending = ""
            return text
        cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            self.pending = ""
            return text[:cut]
        hold = max((_overlap(text, s) for s in self.stop), default=0)
        self.pending = text[len(text) - hold:] if hold else ""
        return text[: len(text) - hold]


def _overlap(text: str, stop: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``stop``."""
    for n in range(min(len(text), len(stop) - 1), 0, -1):
        if text.endswith(stop[:n]):
            return n
    return 0
