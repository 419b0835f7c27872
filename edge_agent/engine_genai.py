"""Generation with onnxruntime-genai, for bundles whose runtime is "onnxruntime-genai".

This is the fast path: the genai builder's fused graph (GroupQueryAttention, MatMulNBits)
run by onnxruntime-genai's C++ loop, with intra-op threads set to the core count. Each
sequence is an ``og.Generator``; the scheduler steps them in turn. onnxruntime-genai 0.15.2
ships ``og.Engine`` for continuous batching, but on the CPU provider it refuses to schedule
anything ("Cannot schedule a request with no tokens" / "Expected at least one request to be
ready"), so it is not used. Token ids come from onnxruntime-genai; text is decoded with the
``tokenizers`` library because genai's tokenizer mangles byte-level BPE (Ġ/Ċ) here.
"""

from __future__ import annotations

import json

import onnxruntime_genai as og

from edge_agent.bundle import Bundle
from edge_agent.engine import (
    GenerationEngine,
    SamplingParams,
    SequenceState,
    eos_token_ids,
    load_tokenizer,
)
from edge_agent.errors import GenerationError, ModelLoadError

_GENAI_PROVIDER = {"cuda": "cuda", "tensorrt": "NvTensorRtRtx"}


class GenaiEngine(GenerationEngine):
    def __init__(self, bundle: Bundle, *, device: str = "cpu", threads: int = 1):
        self.bundle = bundle
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
        genai_ctx = json.loads(bundle.file("genai_config.json").read_text())["model"].get(
            "context_length", bundle.context_length)
        self.context_length = min(bundle.context_length, int(genai_ctx))

    def start(self, prompt_ids: list[int], params: SamplingParams) -> SequenceState:
        gp = og.GeneratorParams(self.model)
        options = {
            "max_length": min(self.context_length, len(prompt_ids) + params.max_tokens),
            "do_sample": not params.greedy,
            "batch_size": 1,
        }
        if not params.greedy:
            options.update(temperature=params.temperature, top_p=params.top_p,
                           top_k=params.top_k or 0)
            if params.seed is not None:
                options["random_seed"] = params.seed
        try:
            gp.set_search_options(**options)
            generator = og.Generator(self.model, gp)
        except Exception as exc:
            raise GenerationError(f"onnxruntime-genai: {exc}") from exc
        return SequenceState(prompt_ids=list(prompt_ids), params=params, data=generator)

    def step(self, seqs: list[SequenceState]) -> list[int]:
        out = []
        for seq in seqs:
            generator = seq.data
            try:
                if not seq.generated:
                    generator.append_tokens(seq.prompt_ids)  # prefill: the prompt's logits
                generator.generate_next_token()
                out.append(int(generator.get_next_tokens()[0]))
            except Exception as exc:
                raise GenerationError(f"onnxruntime-genai: {exc}") from exc
        return out

    def release(self, seq: SequenceState) -> None:
        seq.data = None  # dropping the Generator frees its KV cache

    def close(self) -> None:
        self.model = None
