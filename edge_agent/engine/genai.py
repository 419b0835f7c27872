"""Generation with onnxruntime-genai, for bundles whose runtime is "onnxruntime-genai".

This is the fast path: the genai builder's fused graph (GroupQueryAttention, MatMulNBits)
run by onnxruntime-genai's C++ loop, with intra-op threads set to the core count. Each
sequence is an ``og.Generator``; the scheduler steps them in turn. onnxruntime-genai 0.15.2
ships ``og.Engine`` for continuous batching, but on the CPU provider it refuses to schedule
anything ("Cannot schedule a request with no tokens" / "Expected at least one request to be
ready"), so it is not used: when two or more sequences decode together they move to
``batch.BatchDecoder`` (the same graph, one onnxruntime run for all of them per
step). A lone greedy sequence runs on onnxruntime-genai, which is faster at batch 1, and
finishes there even if others arrive meanwhile; sampled sequences always use the batch
decoder so that their sampler (``edge_agent.engine.sampling``), and therefore a seed's output, do not
depend on how many other requests are running (``EDGEGEN_GENAI_BATCH=0``: onnxruntime-genai
only, as before). Token ids come from onnxruntime-genai; text is decoded with the
``tokenizers`` library because genai's tokenizer mangles byte-level BPE (Ġ/Ċ) here.
"""

from __future__ import annotations

import json
import os

import onnxruntime_genai as og

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
from edge_agent.engine.batch import BatchDecoder, BatchRow
from edge_agent.errors import GenerationError, ModelLoadError

_GENAI_PROVIDER = {"cuda": "cuda", "tensorrt": "NvTensorRtRtx"}


class GenaiEngine(GenerationEngine):
    def __init__(self, bundle: Bundle, *, device: str = "cpu", threads: int = 1,
                 providers: list[str] | None = None, batch: bool | None = None):
        self.bundle = bundle
        self.threads = threads
        self.providers = providers or ["CPUExecutionProvider"]
        # EDGEGEN_GENAI_BATCH=0 turns batching off (to compare). The batch decoder keeps its
        # KV cache in host memory, so it is CPU only; GPU devices keep onnxruntime-genai.
        if batch is None:
            batch = os.environ.get("EDGEGEN_GENAI_BATCH", "1") != "0"
        self.batch_enabled = batch and self.providers[0] == "CPUExecutionProvider"
        self._batch: BatchDecoder | None = None  # loaded on first use
        self.tokenizer = load_tokenizer(bundle)
        self.eos_token_ids = eos_token_ids(bundle)
        try:
            config = og.Config(str(bundle.path))
            config.clear_providers()
            if device in _GENAI_PROVIDER:
                config.append_provider(_GENAI_PROVIDER[device])
            overlay = {"model": {"decoder": {"session_options": {
                "intra_op_num_threads": threads, "inter_op_num_threads": 1}}}}
            config.overlay(json.dumps(overlay))
            self.model = og.Model(config)
        except Exception as exc:  # onnxruntime-genai raises plain RuntimeError
            raise ModelLoadError(f"onnxruntime-genai cannot load {bundle.path}: {exc}") from exc
        self.genai_model = json.loads(bundle.file("genai_config.json").read_text())["model"]
        genai_ctx = self.genai_model.get("context_length", bundle.context_length)
        self.context_length = min(bundle.context_length, int(genai_ctx))

    @property
    def batch(self) -> BatchDecoder:
        if self._batch is None:
            self._batch = BatchDecoder(
                str(self.bundle.path / self.genai_model["decoder"]["filename"]),
                self.genai_model["decoder"], providers=self.providers, threads=self.threads,
                context_length=self.context_length,
                vocab_size=int(self.genai_model.get("vocab_size", 0)))
        return self._batch

    def start(self, prompt_ids: list[int], params: SamplingParams) -> SequenceState:
        if self.batch_enabled and not params.greedy:
            return self.batch.start(prompt_ids, params)
        return self._start_og(prompt_ids, params)

    def _start_og(self, prompt_ids: list[int], params: SamplingParams) -> SequenceState:
        gp = og.GeneratorParams(self.model)
        options = {
            "max_length": min(self.context_length, len(prompt_ids) + params.max_tokens),
            "do_sample": not params.greedy,
            "batch_size": 1,
        }
        if not params.greedy:
            options.update(temperature=params.temperature, top_p=params.top_p,
                           top_k=params.top_k or 0)
            if params.seed is not None and params.seed >= 0:
                options["random_seed"] = params.seed & 0x7FFFFFFF  # genai takes a C int
        try:
            gp.set_search_options(**options)
            generator = og.Generator(self.model, gp)
        except Exception as exc:
            raise GenerationError(f"onnxruntime-genai: {exc}") from exc
        return SequenceState(prompt_ids=list(prompt_ids), params=params, data=generator)

    def step(self, seqs: list[SequenceState]) -> list[StepResult]:
        if not self.batch_enabled or (len(seqs) == 1 and not isinstance(seqs[0].data, BatchRow)):
            return self._step_og(seqs)
        if len(seqs) > 1:
            for seq in seqs:
                if not seq.generated and not isinstance(seq.data, BatchRow):
                    self.batch.adopt(seq)  # not begun yet: drop its og.Generator, batch it
        # a sequence that began alone on onnxruntime-genai finishes there: moving its cache
        # would mean re-reading its tokens in one prefill, whose float rounding differs from
        # step-by-step decoding and can flip a greedy near-tie
        batched = [s for s in seqs if isinstance(s.data, BatchRow)]
        tokens = dict(zip(map(id, batched), self.batch.step(batched))) if batched else {}
        alone = [s for s in seqs if not isinstance(s.data, BatchRow)]
        tokens.update(zip(map(id, alone), self._step_og(alone)))
        return [tokens[id(s)] for s in seqs]

    def _step_og(self, seqs: list[SequenceState]) -> list[StepResult]:
        """One onnxruntime-genai Generator per sequence: a failure is that sequence's alone."""
        return [step_one(seq, self._next_og) for seq in seqs]

    @staticmethod
    def _next_og(seq: SequenceState) -> int:
        generator = seq.data
        try:
            if not seq.generated:
                generator.append_tokens(seq.prompt_ids)  # prefill: the prompt's logits
            generator.generate_next_token()
            return int(generator.get_next_tokens()[0])
        except Exception as exc:
            raise GenerationError(f"onnxruntime-genai: {exc}") from exc

    def release(self, seq: SequenceState) -> None:
        if isinstance(seq.data, BatchRow):
            self.batch.release(seq)
        seq.data = None  # dropping the Generator frees its KV cache

    def close(self) -> None:
        self.model = None
        if self._batch is not None:
            self._batch.close()
            self._batch = None
