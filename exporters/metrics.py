"""Pure numeric comparisons between an exported graph and its reference (numpy in, floats out).

Teacher-forced agreement, not free-running greedy agreement: both models read the same
token sequence (the prompt plus the reference's own greedy continuation), and at each
position we ask whether the bundle's top token is the reference's. A quantized model that
picks one different token early would otherwise be scored against a different text from then
on and look far worse than it is.
"""

from __future__ import annotations

import numpy as np


def max_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    """Largest absolute elementwise difference (shapes must match)."""
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch {a.shape} vs {b.shape}")
    return float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64))))


def top1_matches(logits: np.ndarray, targets: np.ndarray) -> tuple[int, int]:
    """(positions whose argmax equals the target token, positions compared). logits [S, V]."""
    if logits.shape[0] != targets.shape[0]:
        raise ValueError("one target per logits row")
    return int(np.sum(np.argmax(logits, axis=-1) == targets)), int(targets.shape[0])


def mean_nll(logits: np.ndarray, targets: np.ndarray) -> float:
    """Mean negative log-likelihood of ``targets`` under ``logits`` [S, V] (log-softmax in
    float64, so a peaked fp32 distribution does not underflow)."""
    x = logits.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    logz = np.log(np.exp(x).sum(axis=-1))
    picked = x[np.arange(len(targets)), targets]
    return float(np.mean(logz - picked))


def perplexity(logits: np.ndarray, token_ids: np.ndarray) -> float:
    """Perplexity of a sequence from its full-sequence logits: row i predicts token i+1."""
    return float(np.exp(mean_nll(logits[:-1], token_ids[1:])))


def ppl_increase_pct(ppl: float, reference_ppl: float) -> float:
    """How much worse (in percent) the bundle's perplexity is than the reference's."""
    return float((ppl / reference_ppl - 1.0) * 100.0)


def cosine_similarity(a: np.ndarray, b: np.ndarray) -> float:
    a = a.astype(np.float64).ravel()
    b = b.astype(np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def mean_pool(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Mean of the token vectors [S, H] where ``mask`` [S] is 1."""
    m = mask.astype(hidden.dtype)[:, None]
    return (hidden * m).sum(axis=0) / max(float(m.sum()), 1.0)
