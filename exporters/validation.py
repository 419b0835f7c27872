"""Compare an exported graph with its PyTorch reference and produce the manifest's figures.

Causal LMs: every built-in prompt is extended by the reference's greedy continuation; both
models then read that same sequence (teacher forcing) and we record the max |logit diff|
and the share of continuation positions where the bundle's top token is the reference's.
Perplexity of both on a built-in English text shows what quantization cost; a model with
sliding-window layers also reads a sequence longer than its window. Then what users get:
the agent's tokenizer must give the reference's ids, and the agent's engine generates the
greedy continuations, alone and batched, compared with the reference's. Encoders: max
|hidden-state diff| and the cosine similarity of pooled embeddings, and the cosine of what the
agent would serve (its tokenizer, batching and pooling) with the reference's sentence
embeddings.
"""

from __future__ import annotations

import json
from importlib import resources

import numpy as np

from exporters import metrics
from exporters.errors import ValidationFailed
from exporters.onnx_graph import Graph
from exporters.reference import Reference

CONTINUATION_TOKENS = 16
MAX_EVAL_TOKENS = 384
# An fp32 graph computes the same function in a different order (fused attention, other
# kernels): differences of 1e-4..1e-3 on logits of magnitude ~20 are normal, 0.05 is not.
FP32_MAX_LOGIT_DIFF = 0.05


def prompts() -> list[str]:
    return json.loads(resources.files("exporters").joinpath("data/prompts.json").read_text())


def eval_text() -> str:
    return resources.files("exporters").joinpath("data/eval.txt").read_text()


def validate_causal(graph: Graph, ref: Reference, signature: dict, context_length: int,
                    served=None, window: int | None = None) -> dict:
    """``served``: the agent's engine over the staged bundle (None: the graph alone);
    ``window``: the sliding window of the model's local-attention layers, if any."""
    kv, hd = signature["num_kv_heads"], signature["head_dim"]
    agree = total = 0
    max_diff = 0.0
    used = prompts()
    continuations = []
    for prompt in used:
        ids = ref.encode(prompt)
        seq = ref.greedy(ids, CONTINUATION_TOKENS)
        continuations.append((ids, seq[len(ids):]))
        ref_logits = ref.logits(seq)
        got = graph.run(seq, output="logits", kv_heads=kv, head_dim=hd)
        max_diff = max(max_diff, metrics.max_abs_diff(got, ref_logits))
        # Row i predicts token i+1: compare the rows that predict the continuation.
        start = len(ids) - 1
        a, n = metrics.top1_matches(got[start:-1], seq[start + 1:])
        agree, total = agree + a, total + n
    text_ids = ref.encode(eval_text())[: min(MAX_EVAL_TOKENS, context_length)]
    ppl = metrics.perplexity(graph.run(text_ids, output="logits", kv_heads=kv, head_dim=hd),
                             text_ids)
    ref_ppl = metrics.perplexity(ref.logits(text_ids), text_ids)
    figures = {}
    if window and window < context_length:
        figures = _beyond_window(graph, ref, kv, hd, window, context_length)
        max_diff = max(max_diff, figures["beyond_window_max_abs_logit_diff"])
    if served is not None:
        figures.update(_served(served, ref, used, continuations))
    return {
        "reference": "pytorch-fp32",
        "prompts": used,
        "continuation_tokens": CONTINUATION_TOKENS,
        "eval_tokens": len(text_ids),
        "max_abs_logit_diff": max_diff,
        "teacher_forced_top1_agreement": agree / total,
        "perplexity": ppl,
        "reference_perplexity": ref_ppl,
        "ppl_increase_pct": metrics.ppl_increase_pct(ppl, ref_ppl),
        **figures,
    }


def _beyond_window(graph: Graph, ref: Reference, kv: int, hd: int, window: int,
                   context_length: int) -> dict:
    """Teacher-forced agreement on the positions past the sliding window (the eval text
    repeated to ``window`` + 64 tokens): where local and global layers attend differently."""
    text_ids = ref.encode(eval_text())
    length = min(window + 64, context_length)
    ids = np.resize(text_ids, length)
    got = graph.run(ids, output="logits", kv_heads=kv, head_dim=hd)[window:-1]
    want = ref.logits(ids)[window:-1]
    same = int((got.argmax(-1) == want.argmax(-1)).sum())
    return {"beyond_window_tokens": int(length),
            "beyond_window_max_abs_logit_diff": metrics.max_abs_diff(got, want),
            "beyond_window_top1_agreement": same / len(got)}


def _served(engine, ref: Reference, used: list[str], continuations: list) -> dict:
    """The agent's tokenizer and engine against the reference: the share of prompts the
    tokenizer encodes to the reference's ids, and the share of greedy tokens the engine
    generates as the reference does (up to each sequence's first difference), one
    sequence at a time and all together (the engine's batched path)."""
    served_ids = [engine.tokenizer.encode(p, add_special_tokens=True).ids for p in used]
    same_ids = sum(list(a) == list(ids) for a, (ids, _) in zip(served_ids, continuations))
    wanted = [list(cont) for _, cont in continuations]
    prompt_ids = [list(ids) for ids, _ in continuations]  # the reference's: judge the engine
    alone = [_greedy(engine, [ids])[0] for ids in prompt_ids]
    together = _greedy(engine, prompt_ids)
    total = sum(map(len, wanted))
    return {
        "served_tokenizer_match": same_ids / len(used),
        "served_greedy_agreement": sum(map(_prefix, alone, wanted)) / total,
        "served_batched_greedy_agreement": sum(map(_prefix, together, wanted)) / total,
    }


def _greedy(engine, prompt_ids: list[list[int]]) -> list[list[int]]:
    from edge_agent.engine.base import SamplingParams, generate

    params = SamplingParams(max_tokens=CONTINUATION_TOKENS, temperature=0.0, ignore_eos=True)
    out = generate(engine, prompt_ids, params)
    for tokens in out:
        if isinstance(tokens, Exception):
            raise ValidationFailed(f"the agent's engine failed to generate: {tokens}")
    return out


def _prefix(got: list[int], want: list[int]) -> int:
    """How many leading tokens of ``got`` are ``want``'s."""
    count = 0
    for a, b in zip(got, want):
        if a != b:
            break
        count += 1
    return count


def validate_encoder(graph: Graph, ref: Reference, pooling: dict, served) -> dict:
    """Encoders: the graph against the reference on the same ids, and then what users get:
    ``served`` (the agent's own embedding engine over the staged bundle: its
    ``tokenizer.json``, padding of a batch and pooling) against the reference's sentence
    embeddings (its own tokenizer, pooled and normalized as sentence-transformers does)."""
    used = prompts() + [eval_text()[:400]]
    max_diff = 0.0
    min_cos = 1.0
    references = []
    for text in used:
        ids = ref.encode(text)
        want = ref.hidden(ids)
        got = graph.run(ids, output="last_hidden_state")
        max_diff = max(max_diff, metrics.max_abs_diff(got, want))
        ones = np.ones(len(ids), dtype=np.int64)
        if pooling["mode"] == "cls":
            a, b = got[0], want[0]
        else:
            a, b = metrics.mean_pool(got, ones), metrics.mean_pool(want, ones)
        min_cos = min(min_cos, metrics.cosine_similarity(a, b))
        references.append(b)
    vectors, _tokens = served.embed(used)  # one batch: padding and masks on the served path
    min_served = min(metrics.cosine_similarity(v, r) for v, r in zip(vectors, references))
    return {
        "reference": "pytorch-fp32",
        "prompts": used,
        "max_abs_hidden_diff": max_diff,
        "min_pooled_cosine": min_cos,
        "min_served_cosine": min_served,
        "max_abs_logit_diff": None,
        "teacher_forced_top1_agreement": None,
        "perplexity": None,
        "reference_perplexity": None,
        "ppl_increase_pct": None,
    }
