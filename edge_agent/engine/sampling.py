"""Pick the next token from logits: grammar mask, greedy, temperature, top-k, top-p, seeded,
and the logprobs a client asked for.

Numpy on one row of logits, so it is tested on plain arrays. Used by the engines that pick
tokens themselves (``GenerationEngine.picks_tokens``); onnxruntime-genai samples inside its
own loop with the same parameters.
"""

from __future__ import annotations

import numpy as np

from edge_agent.engine.base import SamplingParams, SequenceState, TokenLogprob
from edge_agent.errors import GenerationError


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


def pick(seq: SequenceState, logits: np.ndarray, rng: np.random.Generator) -> int:
    """The next token of ``seq`` from its row of ``logits`` (left unchanged): masked by its
    grammar, sampled, its logprobs noted if asked, its grammar advanced."""
    constraint = seq.constraint
    if constraint is None:
        token = sample(logits, seq.params, rng)
    else:
        constraint.fill()
        token = int(np.argmax(logits)) if seq.params.greedy else -1
        if not constraint.allows(token):  # greedy's fast path: the model's pick is allowed
            allowed = constraint.allowed(logits.shape[-1])
            if not allowed.any():
                raise GenerationError("the response format allows no token here")
            token = sample(np.where(allowed, logits, -np.inf), seq.params, rng)
    if seq.params.logprobs is not None:
        seq.logprobs.append(token_logprob(logits, token, seq.params.logprobs))
    if constraint is not None:
        constraint.advance(token)
    return token


def token_logprob(logits: np.ndarray, token: int, top: int) -> TokenLogprob:
    """``token``'s log-softmax over ``logits``, and the ``top`` likeliest tokens'."""
    scores = logits.astype(np.float64)
    shifted = scores - scores.max()
    logprobs = shifted - np.log(np.exp(shifted).sum())
    best: tuple[tuple[int, float], ...] = ()
    if top:
        ids = np.argpartition(-logprobs, top - 1)[:top]
        ids = ids[np.argsort(-logprobs[ids], kind="stable")]
        best = tuple((int(i), float(logprobs[i])) for i in ids)
    return TokenLogprob(token, float(logprobs[token]), best)
