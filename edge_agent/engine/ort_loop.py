"""Generation with plain onnxruntime, for optimum exports (runtime "onnxruntime").

The graph takes ``input_ids``, ``attention_mask``, optionally ``position_ids``, and
``past_key_values.<i>.key/value``; it returns ``logits`` and ``present.<i>.key/value``. Each
step feeds the previous step's presents straight back as the next pasts (onnxruntime's own
output arrays, no copy on our side) and only the last position's logits are sampled.
Sequences are decoded one after another: they have different lengths, and padding the KV
caches of a batch to a common length costs a copy of every cache at every step.
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
from edge_agent.engine.sampling import make_rng, sample

class _OrtSeq:
    __slots__ = ("past", "length", "rng")

    def __init__(self, past: dict, rng: np.random.Generator):
        self.past = past
        self.length = 0
        self.rng = rng


class OrtEngine(GenerationEngine):
    def __init__(self, bundle: Bundle, *, providers: list[str], threads: int = 1):
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
        if self.past_names:
            first = inputs[self.past_names[0]]
            self.kv_dtype = NUMPY_DTYPES.get(first.type, np.float32)
            sig = bundle.manifest.get("signature", {})
            kv_heads = first.shape[1] if isinstance(first.shape[1], int) else sig["num_kv_heads"]
            head_dim = first.shape[3] if isinstance(first.shape[3], int) else sig["head_dim"]
            self.empty_kv = np.zeros((1, kv_heads, 0, head_dim), dtype=self.kv_dtype)

    def start(self, prompt_ids: list[int], params: SamplingParams) -> SequenceState:
        past = {name: self.empty_kv for name in self.past_names}
        return SequenceState(prompt_ids=list(prompt_ids), params=params,
                             data=_OrtSeq(past, make_rng(params)))

    def step(self, seqs: list[SequenceState]) -> list[StepResult]:
        """Sequences run one after another, so each one's failure is its own."""
        return [step_one(seq, self._step_one) for seq in seqs]

    def _step_one(self, seq: SequenceState) -> int:
        state: _OrtSeq = seq.data
        new = seq.prompt_ids if not seq.generated else seq.generated[-1:]
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
        return sample(logits[0, -1], seq.params, state.rng)

    def close(self) -> None:
        self.session = None
