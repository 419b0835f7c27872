"""Generation with plain onnxruntime, for optimum exports (runtime "onnxruntime").

The graph takes ``input_ids``, ``attention_mask``, optionally ``position_ids``, and
``past_key_values.<i>.key/value``; it returns ``logits`` and ``present.<i>.key/value``. Each
step feeds the previous step's presents straight back as the next pasts (onnxruntime's own
output arrays, no copy on our side) and only the last position's logits are sampled.
Sequences are decoded one after another: they have different lengths, and padding the KV
caches of a batch to a common length costs a copy of every cache at every step. A prompt
starts from the longest prefix the engine's ``PrefixCache`` holds (the pasts are built from
its blocks) and reads only the rest; position ids continue from there.
"""

from __future__ import annotations

import numpy as np

from edge_agent.bundle import Bundle
from edge_agent.engine.base import (
    GenerationEngine,
    SamplingParams,
    SequenceState,
    StepResult,
    eos_token_ids,
    load_tokenizer,
    step_one,
)
from edge_agent.engine.ort import NUMPY_DTYPES, open_session, run_errors
from edge_agent.engine.prefix_cache import PrefixCache
from edge_agent.engine.sampling import make_rng, pick


class _OrtSeq:
    __slots__ = ("past", "length", "rng", "salt")

    def __init__(self, past: dict, rng: np.random.Generator, salt: str | None):
        self.past = past
        self.length = 0
        self.rng = rng
        self.salt = salt


class OrtEngine(GenerationEngine):
    def __init__(self, bundle: Bundle, *, providers: list[str], threads: int = 1,
                 prefix_cache_bytes: int = 0):
        self.bundle = bundle
        self.tokenizer = load_tokenizer(bundle)
        self.eos_token_ids = eos_token_ids(bundle)
        self.context_length = bundle.context_length
        self.session = open_session(str(bundle.file("model.onnx")), providers=providers,
                                    threads=threads)
        inputs = {i.name: i for i in self.session.get_inputs()}
        self.past_names = [n for n in inputs if n.startswith("past_key_values.")]
        self.present_names = [n.replace("past_key_values.", "present.") for n in self.past_names]
        self.has_position_ids = "position_ids" in inputs
        self.output_names = ["logits", *self.present_names]
        # a model without a KV cache re-reads everything anyway: nothing to cache
        self.prefix_cache = PrefixCache(prefix_cache_bytes if self.past_names else 0)
        if self.past_names:
            first = inputs[self.past_names[0]]
            self.kv_dtype = NUMPY_DTYPES.get(first.type, np.float32)
            sig = bundle.manifest.get("signature", {})
            kv_heads = first.shape[1] if isinstance(first.shape[1], int) else sig["num_kv_heads"]
            head_dim = first.shape[3] if isinstance(first.shape[3], int) else sig["head_dim"]
            self.empty_kv = np.zeros((1, kv_heads, 0, head_dim), dtype=self.kv_dtype)

    def start(self, prompt_ids: list[int], params: SamplingParams, *,
              cache_salt: str | None = None) -> SequenceState:
        past = {name: self.empty_kv for name in self.past_names}
        return SequenceState(prompt_ids=list(prompt_ids), params=params,
                             data=_OrtSeq(past, make_rng(params), cache_salt))

    def step(self, seqs: list[SequenceState]) -> list[StepResult]:
        """Sequences run one after another, so each one's failure is its own."""
        return [step_one(seq, self._step_one) for seq in seqs]

    def _step_one(self, seq: SequenceState) -> int:
        state: _OrtSeq = seq.data
        if not seq.generated:
            self._from_cache(seq)
        new = seq.prompt_ids[state.length:] if not seq.generated else seq.generated[-1:]
        n = len(new)
        total = state.length + n
        feed = {
            "input_ids": np.asarray([new], dtype=np.int64),
            "attention_mask": np.ones((1, total), dtype=np.int64),
            **state.past,
        }
        if self.has_position_ids:
            feed["position_ids"] = np.arange(state.length, total, dtype=np.int64)[None, :]
        with run_errors():
            logits, *presents = self.session.run(self.output_names, feed)
        state.past = dict(zip(self.past_names, presents))
        state.length = total
        if not seq.generated:
            self._store(seq, seq.prompt_ids)
        return pick(seq, logits[0, -1], state.rng)

    def _from_cache(self, seq: SequenceState) -> None:
        """Start from the longest cached prefix of the prompt."""
        state: _OrtSeq = seq.data
        # at least two tokens are read again: see batch.BatchEngine._place on exactness
        blocks = self.prefix_cache.lookup(seq.prompt_ids[:-2], state.salt)
        if blocks:
            kv = np.concatenate(blocks, axis=2)  # [pasts, heads, positions, head_dim]
            state.past = {name: kv[i][None] for i, name in enumerate(self.past_names)}
            state.length = seq.cached_tokens = kv.shape[2]

    def _store(self, seq: SequenceState, tokens: list[int]) -> None:
        past = [seq.data.past[name][0] for name in self.past_names]
        self.prefix_cache.store(tokens, seq.data.salt,
                                lambda a, b: np.stack([p[:, a:b] for p in past]))

    def close(self) -> None:
        self.session = None
        self.prefix_cache.clear()
