"""Generation with onnxruntime-genai's own loop: genai bundles on GPUs.

Each sequence is an ``og.Generator`` with its KV cache on the device; the scheduler steps
them in turn. On CPU the agent runs genai bundles with ``batch.BatchEngine`` instead (one
session for every sequence, chunked prefill, a prefix cache); onnxruntime-genai 0.15.2's
``og.Engine`` refuses every request on CPU and exposes no KV cache to share.
``EDGEGEN_GENAI_BATCH=0`` runs this engine on CPU too, to compare. Token ids come from
onnxruntime-genai; text is decoded with the ``tokenizers`` library because genai's tokenizer
mangles byte-level BPE (Ġ/Ċ) here.
"""

from __future__ import annotations

import json

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
from edge_agent.errors import GenerationError, ModelLoadError

_GENAI_PROVIDER = {"cuda": "cuda", "tensorrt": "NvTensorRtRtx"}


class GenaiEngine(GenerationEngine):
    picks_tokens = False  # onnxruntime-genai samples inside its loop

    def __init__(self, bundle: Bundle, *, device: str = "cpu", threads: int = 1):
        self.bundle = bundle
        self.threads = threads
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
        genai_model = json.loads(bundle.file("genai_config.json").read_text())["model"]
        genai_ctx = genai_model.get("context_length", bundle.context_length)
        self.context_length = min(bundle.context_length, int(genai_ctx))

    def start(self, prompt_ids: list[int], params: SamplingParams, *,
              cache_salt: str | None = None) -> SequenceState:
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
        """One onnxruntime-genai Generator per sequence: a failure is that sequence's alone."""
        return [step_one(seq, self._next) for seq in seqs]

    @staticmethod
    def _next(seq: SequenceState) -> int:
        generator = seq.data
        try:
            if not seq.generated:
                generator.append_tokens(seq.prompt_ids)  # prefill: the prompt's logits
            generator.generate_next_token()
            return int(generator.get_next_tokens()[0])
        except Exception as exc:
            raise GenerationError(f"onnxruntime-genai: {exc}") from exc

    def release(self, seq: SequenceState) -> None:
        seq.data = None  # dropping the Generator frees its KV cache

    def close(self) -> None:
        self.model = None
