"""Pick the next token from logits: greedy, temperature, top-k, top-p, seeded.

Pure numpy on one row of logits, so it is tested on plain arrays. Used by the onnxruntime
engine; onnxruntime-genai samples inside its own loop with the same parameters.
"""

from __future__ import annotations

import numpy as np

from edge_agent.engine.base import SamplingParams


def make_rng(params: SamplingParams) -> np.random.Generator:
    """One generator per sequence: the same seed gives the same tokens. A negative seed means
    "no seed" (a fresh random one), as ``-1`` does in llama.cpp and the tools built on it."""
    seed = params.seed
    return np.random.default_rng(None if seed is None or seed < 0 else seed)


def sample(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator) -> int:
    """The next token id for a 1-D row of ``logits``."""
    if params.greedy:
        return int(np.argmax(logits))
    scores = logits.astype(np.float64)
    # Shift before dividing: the best score becomes 0 and the others negative, so a tiny
    # temperature (1e-300 is a valid float) sends them to -inf, never to inf - inf = NaN.
    with np.errstate(over="ignore"):  # -x / 1e-300 is -inf on purpose
        scores = (scores - scores.max()) / params.temperature
    if params.top_k and params.top_k < scores.shape[-1]:
        cut = np.partition(scores, -params.top_k)[-params.top_k]
        scores = np.where(scores < cut, -np.inf, scores)
    probs = np.exp(scores)
    probs /= probs.sum()
    if params.top_p < 1.0:
        order = np.argsort(-probs, kind="stable")
        cumulative = np.cumsum(probs[order])
        # keep the smallest prefix whose mass reaches top_p (always at least one token)
        keep = order[: int(np.searchsorted(cumulative, params.top_p) + 1)]
        mask = np.zeros_like(probs)
        mask[keep] = probs[keep]
        probs = mask / mask.sum()
    return int(rng.choice(probs.shape[-1], p=probs))
