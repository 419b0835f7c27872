"""Token ids → text, incrementally, with stop strings; never emits broken UTF-8.

Byte-level BPE splits a multi-byte character across tokens. ``tokenizers``' own
``DecodeStream`` (one call into Rust per token) decodes a window of recent tokens and returns
text only once it is complete, so a prefix of a character is never released; what is still
incomplete when the sequence ends is dropped, as a full decode would turn it into U+FFFD.
Text that could be the start of a stop string is held back until it is known not to be one,
so a stop string is never emitted.
"""

from __future__ import annotations

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Tokenizer, stop: tuple[str, ...] = ()):
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.stream = DecodeStream(skip_special_tokens=True)
        self.pending = ""          # decoded text not yet released (stop-string lookahead)
        self.stopped = False

    def add(self, token_id: int) -> str:
        """Text released by one more token ('' while held back). After a stop string, ''."""
        if self.stopped:
            return ""
        new = self.stream.step(self.tokenizer, token_id)
        if not new:
            return ""  # mid-character (or a skipped special token): wait for the next token
        return self._release(new)

    def flush(self) -> str:
        """The held-back text at the end of the sequence (no stop string can complete now)."""
        if self.stopped:
            return ""
        out, self.pending = self.pending, ""
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
