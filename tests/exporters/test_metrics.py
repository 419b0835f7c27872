"""The numeric comparisons on hand-made arrays whose answers are known."""

import math

import numpy as np
import pytest

from exporters import metrics


def test_max_abs_diff_and_shape_check():
    a = np.array([[1.0, 2.0], [3.0, 4.0]], dtype=np.float32)
    b = a.copy()
    b[1, 0] = 2.5
    assert metrics.max_abs_diff(a, b) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        metrics.max_abs_diff(a, a[:1])


def test_top1_matches_counts_positions_whose_argmax_is_the_target():
    logits = np.array([[0.1, 0.9, 0.0], [2.0, 0.0, 1.0], [0.0, 0.0, 3.0]])
    assert metrics.top1_matches(logits, np.array([1, 0, 1])) == (2, 3)


def test_perplexity_of_uniform_logits_is_the_vocabulary_size():
    vocab = 7
    ids = np.array([0, 3, 6, 2, 5])
    assert metrics.perplexity(np.zeros((5, vocab)), ids) == pytest.approx(vocab)


def test_perplexity_of_a_certain_model_is_one_and_survives_large_logits():
    ids = np.array([0, 1, 2, 1])
    logits = np.full((4, 3), -1e4, dtype=np.float32)
    for i, nxt in enumerate(ids[1:]):
        logits[i, nxt] = 1e4
    assert metrics.perplexity(logits, ids) == pytest.approx(1.0)


def test_ppl_increase_pct():
    assert metrics.ppl_increase_pct(11.0, 10.0) == pytest.approx(10.0)
    assert metrics.ppl_increase_pct(9.0, 10.0) == pytest.approx(-10.0)


def test_cosine_and_mean_pool():
    h = np.array([[1.0, 0.0], [3.0, 2.0], [100.0, 100.0]])
    pooled = metrics.mean_pool(h, np.array([1, 1, 0]))
    assert pooled.tolist() == [2.0, 1.0]
    assert metrics.cosine_similarity(pooled, pooled * 3) == pytest.approx(1.0)
    assert metrics.cosine_similarity(np.array([1.0, 0]), np.array([0, 1.0])) == pytest.approx(0.0)
    assert not math.isnan(metrics.cosine_similarity(pooled, -pooled))
