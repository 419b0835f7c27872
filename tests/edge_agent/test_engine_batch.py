"""Batched decoding of genai bundles (edge_agent.engine.batch) against onnxruntime-genai alone.

Sequences of different prompt lengths, joining the batch at different steps and leaving it
when done, must produce the same greedy tokens, token for token, as each decoded alone by
onnxruntime-genai's own generator. Driven the way the scheduler drives an engine.
"""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer

from edge_agent.engine.base import SamplingParams
from edge_agent.engine.genai import GenaiEngine
from edge_agent.engine.batch import BatchRow
from tests.support.genai_reference import genai_greedy

N = 32
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village at the edge of a great forest, there lived",
    "Hi",
]
JOIN_AT = [0, 3, 3, 11]          # the step at which each prompt is submitted
# (the first starts alone on onnxruntime-genai and finishes there; the others batch)
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
    e = GenaiEngine(tiny_genai_bundle, threads=2)
    yield e
    e.close()


def drive(engine, prompt_ids, join_at, params_for) -> tuple[list[list[int]], int]:
    """Step like the scheduler: submit at join_at, one step for all running, release at N.

    Returns every sequence's tokens and the most sequences the batch decoder held at once."""
    running, results, widest = [], {}, 0
    step = 0
    while len(results) < len(prompt_ids):
        for i, at in enumerate(join_at):
            if at == step:
                running.append((i, engine.start(prompt_ids[i], params_for(i))))
        if running:
            tokens = engine.step([s for _, s in running])
            widest = max(widest, sum(isinstance(s.data, BatchRow) for _, s in running))
            for (i, seq), tok in zip(list(running), tokens):
                seq.generated.append(tok)
                if len(seq.generated) == N:
                    results[i] = list(seq.generated)
                    engine.release(seq)
                    running.remove((i, seq))
        step += 1
    return [results[i] for i in range(len(prompt_ids))], widest


def test_joining_sequences_equal_each_decoded_alone(engine, prompt_ids, reference):
    got, widest = drive(engine, prompt_ids, JOIN_AT, lambda i: GREEDY)
    assert widest == 3  # they really were decoded together
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
            seq.generated.append(tok)
            if len(seq.generated) == seq.params.max_tokens:
                running.remove(seq)
                engine.release(seq)
    for seq, ref, n in zip(seqs, reference, lengths):
        assert seq.generated == ref[:n]


def test_lone_greedy_sequence_stays_on_onnxruntime_genai(engine, prompt_ids, reference):
    seq = engine.start(prompt_ids[0], GREEDY)
    for _ in range(4):
        seq.generated.extend(engine.step([seq]))
    assert not isinstance(seq.data, BatchRow)
    late = engine.start(prompt_ids[1], GREEDY)
    for _ in range(4):
        for s, tok in zip((seq, late), engine.step([seq, late])):
            s.generated.append(tok)
    assert not isinstance(seq.data, BatchRow) and isinstance(late.data, BatchRow)
    assert seq.generated == reference[0][:8] and late.generated == reference[1][:4]
    engine.release(seq)
    engine.release(late)


def test_seeded_sampling_does_not_depend_on_concurrency(engine, prompt_ids):
    sampled = SamplingParams(max_tokens=N, temperature=0.9, top_p=0.95, top_k=40, seed=7,
                             ignore_eos=True)
    alone, _ = drive(engine, prompt_ids[:1], [0], lambda i: sampled)
    together, _ = drive(engine, prompt_ids, JOIN_AT,
                        lambda i: sampled if i == 0 else GREEDY)
    assert together[0] == alone[0]


def test_batching_can_be_turned_off(tiny_genai_bundle, prompt_ids, reference):
    e = GenaiEngine(tiny_genai_bundle, threads=2, batch=False)
    try:
        got, _ = drive(e, prompt_ids, JOIN_AT, lambda i: GREEDY)
        assert e._batch is None
        assert got == reference
    finally:
        e.close()
