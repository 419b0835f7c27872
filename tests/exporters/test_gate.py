"""The quality gate as a table of figures and verdicts."""

import pytest

from exporters.gate import DEFAULT_MAX_PPL_INCREASE_PCT, MIN_EMBEDDING_COSINE, judge


def causal(ppl_increase: float) -> dict:
    ref = 20.0
    return {"perplexity": ref * (1 + ppl_increase / 100), "reference_perplexity": ref,
            "ppl_increase_pct": ppl_increase, "teacher_forced_top1_agreement": 0.8,
            "max_abs_logit_diff": 3.0}


@pytest.mark.parametrize("increase, limit, passed", [
    (0.0, 25.0, True),
    (-2.0, 0.0, True),          # better than the reference: passes any limit
    (11.0, 25.0, True),
    (25.0, 25.0, True),         # the limit itself is allowed
    (25.01, 25.0, False),
    (11.0, 5.0, False),
])
def test_causal_gate(increase, limit, passed):
    decision = judge(causal(increase), limit)
    assert decision.passed is passed
    assert f"limit {limit:g} %" in decision.reason
    assert "agreement 80.0%" in decision.reason


def test_gate_record_says_when_a_failed_gate_was_forced():
    failed = judge(causal(50.0), 25.0)
    assert failed.as_manifest(25.0, forced=True) == {
        "max_ppl_increase_pct": 25.0, "passed": False, "forced": True}
    ok = judge(causal(1.0), 25.0)
    assert ok.as_manifest(25.0, forced=True)["forced"] is False


@pytest.mark.parametrize("cosine, passed", [(1.0, True), (MIN_EMBEDDING_COSINE, True),
                                            (0.95, False)])
def test_embedding_gate_uses_pooled_cosine(cosine, passed):
    v = {"perplexity": None, "min_pooled_cosine": cosine, "max_abs_hidden_diff": 0.1}
    assert judge(v, DEFAULT_MAX_PPL_INCREASE_PCT).passed is passed


@pytest.mark.parametrize("served, passed", [(0.9999, True), (0.2248, False)])
def test_embedding_gate_also_holds_the_served_cosine(served, passed):
    """A graph that matches the reference on its ids but is served badly (all-MiniLM's
    padded tokenizer.json gave 0.2248) does not pass."""
    v = {"perplexity": None, "min_pooled_cosine": 1.0, "min_served_cosine": served,
         "max_abs_hidden_diff": 0.1}
    assert judge(v, DEFAULT_MAX_PPL_INCREASE_PCT).passed is passed
