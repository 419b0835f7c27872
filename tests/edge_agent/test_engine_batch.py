"""The CPU engine of genai bundles (edge_agent.engine.batch) against onnxruntime-genai alone.

Sequences of different prompt lengths, joining the batch at different steps and leaving it
when done, must produce the same greedy tokens, token for token, as each decoded alone by
onnxruntime-genai's own generator. Driven the way the scheduler drives an engine.
"""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer

from edge_agent.engine.base import SamplingParams
from edge_agent.engine.batch import BatchEngine
from edge_agent.engine.loader import load_engine
from edge_agent.settings import AgentSettings
from tests.support.genai_reference import genai_greedy

N = 32
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village at the edge of a great forest, there lived",
    "Hi",
]
JOIN_AT = [0, 3, 3, 11]          # the step at which each prompt is submitted
GREEDY = SamplingParams(max_tokens=N, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def prompt_ids(tiny_genai_bundle):
    tok = Tokenizer.from_file(str(tiny_genai_bundle.file("tokenizer.json")))
    ids = [tok.encode(p).ids for p in PROMPTS]
    assert len({len(i) for i in ids}) == len(ids), "prompts must differ in length"
    return ids


@pytest.fixture(scope="module")
def reference(tiny_genai_bundle, prompt_ids) -> list[list[int]]:
    return genai_greedy(tiny_genai_bundle.path, prompt_ids, N)


@pytest.fixture(scope="module")
def engine(tiny_genai_bundle):
    e = BatchEngine(tiny_genai_bundle, threads=2)
    yield e
    e.close()


def drive(engine, prompt_ids, join_at, params_for) -> tuple[list[list[int]], int]:
    """Step like the scheduler: submit at join_at, one step for all running, release at N.

    Returns every sequence's tokens and the most sequences the engine held in its rows at once."""
    running, results, widest = [], {}, 0
    step = 0
    while len(results) < len(prompt_ids):
        for i, at in enumerate(join_at):
            if at == step:
                running.append((i, engine.start(prompt_ids[i], params_for(i))))
        if running:
            tokens = engine.step([s for _, s in running])
            widest = max(widest, len(getattr(engine, "rows", ())))
            for (i, seq), tok in zip(list(running), tokens):
                if tok is None:  # its prompt is still being read
                    continue
                seq.generated.append(tok)
                if len(seq.generated) == N:
                    results[i] = list(seq.generated)
                    engine.release(seq)
                    running.remove((i, seq))
        step += 1
    return [results[i] for i in range(len(prompt_ids))], widest


def test_joining_sequences_equal_each_decoded_alone(engine, prompt_ids, reference):
    got, widest = drive(engine, prompt_ids, JOIN_AT, lambda i: GREEDY)
    assert widest == 4  # they really were decoded together
    for prompt, ref, tokens in zip(PROMPTS, reference, got):
        assert len(ref) == N
        assert tokens == ref, prompt


def test_all_at_once_and_released_out_of_order(engine, prompt_ids, reference):
    # different max lengths: sequences leave the batch at different steps, rows get compacted
    lengths = [N, 9, 20, 14]
    got, _ = drive(engine, prompt_ids, [0, 0, 0, 0], lambda i: GREEDY)
    assert got == reference
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in lengths]
    seqs = [engine.start(ids, p) for ids, p in zip(prompt_ids, params)]
    running = list(seqs)
    while running:
        for seq, tok in zip(list(running), engine.step(running)):
            if tok is None:
                continue
            seq.generated.append(tok)
            if len(seq.generated) == seq.params.max_tokens:
                running.remove(seq)
                engine.release(seq)
    for seq, ref, n in zip(seqs, reference, lengths):
        assert seq.generated == ref[:n]


def test_seeded_sampling_does_not_depend_on_concurrency(engine, prompt_ids):
    sampled = SamplingParams(max_tokens=N, temperature=0.9, top_p=0.95, top_k=40, seed=7,
                             ignore_eos=True)
    alone, _ = drive(engine, prompt_ids[:1], [0], lambda i: sampled)
    together, _ = drive(engine, prompt_ids, JOIN_AT,
                        lambda i: sampled if i == 0 else GREEDY)
    assert together[0] == alone[0]


def test_onnxruntime_genai_loop_on_request(tiny_genai_bundle, prompt_ids, reference,
                                           monkeypatch):
    # EDGEGEN_GENAI_BATCH=0: onnxruntime-genai's own loop on CPU too (to compare), same tokens
    monkeypatch.setenv("EDGEGEN_GENAI_BATCH", "0")
    e = load_engine(tiny_genai_bundle, AgentSettings(bundle="x", node="n", threads=2))
    try:
        assert type(e).__name__ == "GenaiEngine"
        got, _ = drive(e, prompt_ids, JOIN_AT, lambda i: GREEDY)
        assert got == reference
    finally:
        e.close()
