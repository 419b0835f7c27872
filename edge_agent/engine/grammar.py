"""Grammar-constrained decoding with llguidance: which tokens may come next, per sequence.

llguidance compiles a grammar (a JSON Schema, or a Lark grammar that embeds JSON Schemas)
against the model's tokenizer; at each step a sequence's ``Constraint`` gives the mask of
tokens that keep its text inside the grammar (tens of microseconds here), and is advanced by
the token the sampler picked. When the grammar is complete only end-of-sequence is allowed.

This module is the only one that imports llguidance (import-linter contract). It also owns
the tokenizer's view llguidance needs, ``TokenVocabulary``, which gives each token's bytes
(used for logprobs too).
"""

from __future__ import annotations

import json

import llguidance.numpy as llg_numpy
import numpy as np
from llguidance import LLMatcher, LLTokenizer
from tokenizers import Tokenizer

from edge_agent.errors import GenerationError

# A small model can write digits forever ("1.5588888...", "UTC+123456789..."), and a JSON
# number has no length limit. A run of more than MAX_DIGIT_RUN digits is ended by allowing only
# what is not a digit, where the grammar allows anything else (a pattern of only digits keeps
# its digits). llama.cpp's JSON grammars bound numbers the same way (16 digits before and after
# the point); a float64 holds no more than 17 significant digits anyway.
MAX_DIGIT_RUN = 16

# The same kind of guard for loops: a small model greedy-decoding under a grammar can repeat a
# few tokens until max_tokens ('{"en": {"en": {"en": ...' in json_object mode). When the text
# ends with the same run of tokens three times over, LOOP_TOKENS tokens at least, the token
# that would go round once more is not allowed, if the grammar allows another (the idea of
# llama.cpp's DRY sampler, applied only to constrained output).
LOOP_PERIOD = 32          # the longest repeated run looked for, in tokens
LOOP_TOKENS = 24

# JSON as people and models write it: ", " and ": ", no free whitespace (free whitespace
# lets a small model pad an answer with newlines until max_tokens).
JSON_OPTIONS = {"item_separator": ", ", "key_separator": ": ", "whitespace_flexible": False}

_PROBE = 'Hello wörld\n  {"a": 1, "b": [true, null]} 温度 ½'


class GrammarError(ValueError):
    """A grammar llguidance refuses; the message says what it cannot enforce."""


def json_schema_grammar(schema: dict) -> str:
    """The llguidance grammar of a JSON Schema (not yet checked: ``TokenVocabulary.check``)."""
    try:
        return LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
    except ValueError as exc:
        raise GrammarError(str(exc)) from exc


def lark_json(schema: dict) -> str:
    """A JSON Schema inside a Lark grammar, written with ``JSON_OPTIONS``."""
    return "%json " + json.dumps({**schema, "x-guidance": JSON_OPTIONS})


def lark_grammar(source: str) -> str:
    """The llguidance grammar of a Lark grammar (``%json {...}`` embeds a JSON Schema)."""
    return LLMatcher.grammar_from_lark(source)


def _llguidance_json(tokenizer: Tokenizer) -> str:
    """The tokenizer as llguidance reads it. A byte-level BPE whose decoder is a Sequence
    (transformers' GGUF converter writes ByteFallback, Fuse, Replace and ByteLevel) is not
    recognised as byte-level, and its tokens would be taken as the UTF-8 of "Ġ" and "Ċ";
    its decoder is in effect ByteLevel, so llguidance is told that."""
    data = json.loads(tokenizer.to_str())
    pre = data.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    if any((s or {}).get("type") == "ByteLevel" for s in steps):
        data["decoder"] = {"type": "ByteLevel", "add_prefix_space": True,
                           "trim_offsets": True, "use_regex": True}
    return json.dumps(data)


class TokenVocabulary:
    """A model's tokenizer as llguidance sees it (about 0.3 s to build for a 49k vocabulary,
    so one per loaded model, built on first use)."""

    def __init__(self, tokenizer: Tokenizer, eos_ids: frozenset[int]):
        self.eos_ids = np.asarray(sorted(eos_ids), dtype=np.int64)
        self.tokenizer = LLTokenizer(_llguidance_json(tokenizer),
                                     eos_token=sorted(eos_ids) or None)
        # A tokenizer llguidance reads differently from the model would constrain the wrong
        # text: refuse rather than serve it.
        ids = tokenizer.encode(_PROBE, add_special_tokens=False).ids
        if self.tokenizer.decode_bytes(ids) != _PROBE.encode():
            raise GrammarError("this model's tokenizer is not one llguidance reads correctly")
        # per token: its bytes' leading digit, trailing digits, whether it is all digits
        size = self.tokenizer.vocab_size
        self.digit_start = np.zeros(size, dtype=bool)
        self.trailing_digits = np.zeros(size, dtype=np.int32)
        self.all_digits = np.zeros(size, dtype=bool)
        for token in range(size):
            raw = self.tokenizer.decode_bytes([token])
            if raw:
                stripped = raw.rstrip(b"0123456789")
                self.digit_start[token] = raw[:1].isdigit()
                self.trailing_digits[token] = len(raw) - len(stripped)
                self.all_digits[token] = not stripped

    def check(self, grammar: str) -> str | None:
        """Why llguidance cannot enforce ``grammar`` (None: it can)."""
        return LLMatcher.validate_grammar(grammar, self.tokenizer) or None

    def constraint(self, grammar: str) -> Constraint:
        matcher = LLMatcher(self.tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise GrammarError(matcher.get_error())
        return Constraint(matcher, self)

    def token_bytes(self, token_id: int) -> bytes:
        return self.tokenizer.decode_bytes([token_id])

    def token_text(self, token_id: int) -> str:
        """A token's text; a token that is part of a UTF-8 character shows its bytes as
        ``bytes:\\xNN`` (OpenAI's convention, with ``bytes`` alongside)."""
        raw = self.token_bytes(token_id)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return "".join(f"bytes:\\x{b:02x}" for b in raw)


class Constraint:
    """One sequence's place in its grammar."""

    __slots__ = ("_bits", "_digits", "_matcher", "_tokens", "_vocab")

    def __init__(self, matcher: LLMatcher, vocab: TokenVocabulary, digits: int = 0,
                 tokens: tuple[int, ...] = ()):
        self._matcher = matcher
        self._vocab = vocab
        self._bits = llg_numpy.allocate_token_bitmask(1, vocab.tokenizer.vocab_size)
        self._digits = digits          # the digits the text ends with
        self._tokens = list(tokens)    # the last 3 x LOOP_PERIOD tokens

    def copy(self) -> Constraint:
        """An independent copy at the same place (one per choice of ``n``)."""
        return Constraint(self._matcher.deep_copy(), self._vocab, self._digits,
                          tuple(self._tokens))

    def fill(self) -> None:
        """Compute the mask of the next token (llguidance); ``allows`` and ``allowed`` read it."""
        llg_numpy.fill_next_token_bitmask(self._matcher, self._bits, 0)

    def allows(self, token: int) -> bool:
        """Whether ``token`` may come next, cheaply: False also where a guard may refuse it
        (``allowed`` then decides)."""
        vocab = self._vocab
        if not 0 <= token < self._bits.shape[1] * 32 or token in vocab.eos_ids:
            return False
        if not (int(self._bits[0, token >> 5]) >> (token & 31)) & 1:
            return False
        if self._digits >= MAX_DIGIT_RUN and vocab.digit_start[token]:
            return False
        return token != self._loop_continuation()

    def allowed(self, size: int) -> np.ndarray:
        """A boolean mask over ``size`` logits: the tokens that may come next (after
        ``fill``)."""
        mask = np.unpackbits(self._bits.view(np.uint8), bitorder="little").view(bool)
        if len(mask) < size:
            mask = np.concatenate([mask, np.zeros(size - len(mask), dtype=bool)])
        mask = mask[:size]
        vocab = self._vocab
        eos = vocab.eos_ids[vocab.eos_ids < size]
        if mask[eos].any():
            mask[eos] = True  # every EOS id ends it
        if self._digits >= MAX_DIGIT_RUN:
            n = min(size, len(vocab.digit_start))
            ended = mask.copy()
            ended[:n] &= ~vocab.digit_start[:n]
            if ended.any():
                mask = ended
        again = self._loop_continuation()
        if again is not None and again < size and mask[again]:
            mask[again] = False
            if not mask.any():
                mask[again] = True
        return mask

    def _loop_continuation(self) -> int | None:
        """The token that would go round the run the text ends with once more, if the text
        ends with that run three times over (LOOP_TOKENS at least)."""
        tokens = self._tokens
        for period in range(1, min(LOOP_PERIOD, len(tokens) // 3) + 1):
            if tokens[-1] != tokens[-1 - period]:
                continue
            span = max(3 * period, -(-LOOP_TOKENS // period) * period)
            tail = tokens[-span:]
            if len(tail) == span and tail[period:] == tail[:-period]:
                return tail[-period]
        return None

    def advance(self, token: int) -> None:
        if token in self._vocab.eos_ids:
            return  # the sequence ends here; llguidance knows only its first EOS id
        if not self._matcher.consume_token(token):
            raise GenerationError(f"the grammar refused token {token}: "
                                  f"{self._matcher.get_error()}")
        self._tokens.append(token)
        if len(self._tokens) > 3 * LOOP_PERIOD:
            del self._tokens[:-3 * LOOP_PERIOD]
        vocab = self._vocab
        if token < len(vocab.all_digits):
            tail = int(vocab.trailing_digits[token])
            self._digits = self._digits + tail if vocab.all_digits[token] else tail
