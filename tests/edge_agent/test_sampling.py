import numpy as np
import pytest

from edge_agent.engine.base import SamplingParams, SequenceState
from edge_agent.engine.sampling import make_rng, pick, sample, token_logprob

LOGITS = np.array([1.0, 3.0, 2.0, 0.5, -1.0], dtype=np.float32)


def test_greedy_takes_the_argmax():
    assert sample(LOGITS, SamplingParams(max_tokens=1, temperature=0.0), make_rng(
        SamplingParams(max_tokens=1))) == 1


def test_top_k_one_is_greedy_even_with_temperature():
    p = SamplingParams(max_tokens=1, temperature=1.5, top_k=1)
    assert {sample(LOGITS, p, make_rng(p)) for _ in range(20)} == {1}


def test_same_seed_same_sequence():
    p = SamplingParams(max_tokens=1, temperature=1.0, seed=42)
    a, b = make_rng(p), make_rng(p)
    assert [sample(LOGITS, p, a) for _ in range(50)] == [sample(LOGITS, p, b) for _ in range(50)]


def test_top_k_and_top_p_restrict_the_support():
    pk = SamplingParams(max_tokens=1, temperature=1.0, top_k=2, seed=0)
    rng = make_rng(pk)
    assert {sample(LOGITS, pk, rng) for _ in range(300)} == {1, 2}
    # probabilities ~ [.08,.60,.22,.05,.01]: top_p .7 keeps tokens 1 and 2 only
    pp = SamplingParams(max_tokens=1, temperature=1.0, top_p=0.7, seed=0)
    rng = make_rng(pp)
    assert {sample(LOGITS, pp, rng) for _ in range(300)} == {1, 2}


def test_high_temperature_spreads_the_choice():
    p = SamplingParams(max_tokens=1, temperature=2.0, seed=1)
    rng = make_rng(p)
    assert len({sample(LOGITS, p, rng) for _ in range(500)}) == 5


@pytest.mark.parametrize("temperature", [2.2250738585e-313, 1e-300, 1e-30])
def test_a_tiny_temperature_is_nearly_greedy_not_nan(temperature):
    """Found by fuzzing the agent: logits / 2e-313 overflowed to inf, and inf - inf is NaN."""
    p = SamplingParams(max_tokens=1, temperature=temperature, top_p=0.9, top_k=2, seed=3)
    assert sample(LOGITS, p, make_rng(p)) == int(np.argmax(LOGITS))


def test_a_negative_seed_means_a_random_one():
    p = SamplingParams(max_tokens=1, temperature=1.0, seed=-1)
    draws = {sample(LOGITS, p, make_rng(p)) for _ in range(50)}
    assert len(draws) > 1  # not one fixed sequence, and no error


def test_logprobs_are_the_log_softmax_of_the_raw_logits():
    logits = np.array([2.0, 0.5, -1.0, 3.0], dtype=np.float32)
    expected = logits - np.log(np.exp(logits).sum())
    lp = token_logprob(logits, 1, 3)
    assert lp.token_id == 1 and lp.logprob == pytest.approx(expected[1])
    assert [t for t, _ in lp.top] == [3, 0, 1]
    assert [v for _, v in lp.top] == pytest.approx(expected[[3, 0, 1]])
    assert token_logprob(logits, 2, 0).top == ()


def test_pick_notes_logprobs_of_the_model_not_of_the_sampler():
    """Temperature and top-k shape the choice, not the reported logprobs (as vLLM reports)."""
    logits = np.array([1.0, 3.0, 2.0], dtype=np.float32)
    seq = SequenceState(prompt_ids=[0], params=SamplingParams(max_tokens=1, temperature=0.0,
                                                              logprobs=2))
    assert pick(seq, logits, np.random.default_rng(0)) == 1
    [lp] = seq.logprobs
    assert lp.logprob == pytest.approx(token_logprob(logits, 1, 0).logprob)
    assert [t for t, _ in lp.top] == [1, 2]
