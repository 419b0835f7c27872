import numpy as np

from edge_agent.engine.base import SamplingParams
from edge_agent.engine.sampling import make_rng, sample

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
