"""Greedy output through the agent's HTTP API equals the reference runtime's, 32 tokens:
onnxruntime-genai's own generate loop for genai bundles, Optimum's ORTModelForCausalLM for
optimum bundles. Text is compared after decoding both with the same `tokenizers` tokenizer."""

from __future__ import annotations

import httpx
import numpy as np
import pytest
from tokenizers import Tokenizer

from tests.e2e.agent_support import start_agent
from tests.support.genai_reference import genai_greedy

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small"]
N = 32


def _agent_texts(bundle, log_dir) -> list[tuple[str, int]]:
    a = start_agent(bundle.path, log_dir, f"parity-{bundle.runtime}")
    try:
        out = []
        for p in PROMPTS:
            r = httpx.post(a.url + "/v1/completions", timeout=120, json={
                "prompt": p, "max_tokens": N, "temperature": 0, "ignore_eos": True})
            assert r.status_code == 200, r.text
            body = r.json()
            out.append((body["choices"][0]["text"], body["usage"]["completion_tokens"]))
        return out
    finally:
        assert a.stop() == 0


def _genai_reference(bundle) -> list[list[int]]:
    tok = Tokenizer.from_file(str(bundle.file("tokenizer.json")))
    return genai_greedy(bundle.path, [tok.encode(p).ids for p in PROMPTS], N)


def _optimum_reference(bundle) -> list[list[int]]:
    from optimum.onnxruntime import ORTModelForCausalLM

    tok = Tokenizer.from_file(str(bundle.file("tokenizer.json")))
    model = ORTModelForCausalLM.from_pretrained(bundle.path, use_cache=True, use_io_binding=False)
    out = []
    for p in PROMPTS:
        ids = tok.encode(p).ids
        x = np.asarray([ids], dtype=np.int64)
        import torch

        gen = model.generate(torch.from_numpy(x), attention_mask=torch.ones_like(torch.from_numpy(x)),
                             do_sample=False, max_new_tokens=N, min_new_tokens=N)
        out.append([int(t) for t in gen[0, len(ids):]])
    return out


def _check(bundle, reference: list[list[int]], got: list[tuple[str, int]]):
    tok = Tokenizer.from_file(str(bundle.file("tokenizer.json")))
    for p, ref_ids, (text, n) in zip(PROMPTS, reference, got):
        assert len(ref_ids) == N and n == N, p
        assert text == tok.decode(ref_ids, skip_special_tokens=True), p


def test_genai_agent_equals_onnxruntime_genai_generate(tiny_genai_bundle, tmp_path):
    _check(tiny_genai_bundle, _genai_reference(tiny_genai_bundle),
           _agent_texts(tiny_genai_bundle, tmp_path))


def test_onnxruntime_agent_equals_optimum_ortmodel(tiny_optimum_bundle, tmp_path):
    _check(tiny_optimum_bundle, _optimum_reference(tiny_optimum_bundle),
           _agent_texts(tiny_optimum_bundle, tmp_path))


@pytest.mark.smollm2
def test_smollm2_int4_agent_equals_onnxruntime_genai_generate(smollm2_int4_bundle, tmp_path):
    _check(smollm2_int4_bundle, _genai_reference(smollm2_int4_bundle),
           _agent_texts(smollm2_int4_bundle, tmp_path))
