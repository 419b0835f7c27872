"""The quality gate: decide from the validation figures whether a bundle may be written.

Pure decision logic on plain numbers, so it is tested on tables of figures.

Default for causal LMs, ``DEFAULT_MAX_PPL_INCREASE_PCT`` = 25 %: measured on SmolLM2-135M
against its fp32 reference on the built-in text, healthy exports cost +5.6 to +8.1 % (optimum
int8, MLP down projections kept fp32) and +11.0 % (genai int4, block 32), while a broken one
(dynamic int8 of every MatMul, crushed by activation outliers) cost +60 % with top-1
agreement falling to 69 %, and full-range int8 weights on a CPU without VNNI (saturated
kernels, ``exporters.quantize``) +11,399 %. 25 % passes the healthy ones with room and stops
the broken.
Embedding models have no perplexity; they are gated on the cosine similarity of pooled
embeddings against the reference.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_MAX_PPL_INCREASE_PCT = 25.0
MIN_EMBEDDING_COSINE = 0.99


@dataclass(frozen=True)
class GateDecision:
    passed: bool
    reason: str

    def as_manifest(self, max_ppl_increase_pct: float, forced: bool) -> dict:
        return {"max_ppl_increase_pct": max_ppl_increase_pct, "passed": self.passed,
                "forced": forced and not self.passed}


def judge(validation: dict, max_ppl_increase_pct: float) -> GateDecision:
    """Pass or fail the figures in ``validation`` (as recorded in the manifest)."""
    if validation.get("perplexity") is not None:
        inc = validation["ppl_increase_pct"]
        ok = inc <= max_ppl_increase_pct
        return GateDecision(ok, (
            f"perplexity {validation['perplexity']:.3f} vs reference "
            f"{validation['reference_perplexity']:.3f} (+{inc:.2f} %, limit "
            f"{max_ppl_increase_pct:g} %); teacher-forced top-1 agreement "
            f"{validation['teacher_forced_top1_agreement']:.1%}; max |logit diff| "
            f"{validation['max_abs_logit_diff']:.4g}"
        ))
    # The served cosine (the agent's tokenizer, batching and pooling) counts as much as the
    # graph's own: a bundle that embeds well only when fed the reference's ids is not good.
    cos = min(validation["min_pooled_cosine"],
              validation.get("min_served_cosine", validation["min_pooled_cosine"]))
    ok = cos >= MIN_EMBEDDING_COSINE
    return GateDecision(ok, (
        f"pooled-embedding cosine vs reference {cos:.5f} (minimum {MIN_EMBEDDING_COSINE}); "
        f"max |hidden diff| {validation['max_abs_hidden_diff']:.4g}"
    ))
