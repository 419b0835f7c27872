"""The prefix cache and chunked prefill inside the engines, on tiny genai and optimum bundles.

A cache hit must give the same greedy tokens as no cache, token for token (the engines read
at least two prompt tokens again, and cache only KV that prefill runs computed); tenants do
not share entries; the budget holds; a long prompt is read in chunks while other sequences
keep receiving a token at every step.
"""

from __future__ import annotations

import numpy as np
import pytest

from edge_agent.engine.base import SamplingParams, generate
from edge_agent.engine.batch import BatchEngine
from edge_agent.engine.ort_loop import OrtEngine

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
RNG = np.random.default_rng(0)
SYSTEM = [int(t) for t in RNG.integers(100, 40_000, 150)]   # a shared "system prompt"
# 150 + 11 = 161 tokens: a hit on 160 would leave a 1-token run, which the engines avoid
QUESTIONS = [[int(t) for t in RNG.integers(100, 40_000, n)] for n in (9, 23, 2, 11)]


def make(kind: str, bundle, cache_mb: float = 64):
    budget = int(cache_mb * 2**20)
    if kind == "genai":
        return BatchEngine(bundle, threads=2, prefix_cache_bytes=budget)
    return OrtEngine(bundle, providers=["CPUExecutionProvider"], threads=2,
                     prefix_cache_bytes=budget)


@pytest.fixture(params=["genai", "optimum"])
def engines(request, tiny_genai_bundle, tiny_optimum_bundle):
    """(engine with a prefix cache, the same bundle without one)."""
    bundle = tiny_genai_bundle if request.param == "genai" else tiny_optimum_bundle
    cached, plain = make(request.param, bundle), make(request.param, bundle, cache_mb=0)
    yield cached, plain
    cached.close()
    plain.close()


def one(engine, prompt, params=GREEDY, salt=None):
    """Generate for one prompt; (tokens, cached_tokens)."""
    seq = engine.start(prompt, params, cache_salt=salt)
    try:
        while len(seq.generated) < params.max_tokens:
            (token,) = engine.step([seq])
            assert not isinstance(token, Exception), token
            if token is not None:
                seq.generated.append(token)
        return list(seq.generated), seq.cached_tokens
    finally:
        engine.release(seq)


def decoding(engine, prompt):
    """A sequence with its prompt read and its first token out: one that decodes in the
    following steps, for 500 tokens."""
    seq = engine.start(prompt, SamplingParams(max_tokens=500, temperature=0.0, ignore_eos=True))
    seq.generated.append(engine.step([seq])[0])
    return seq


def test_a_hit_gives_the_tokens_of_no_cache(engines):
    cached, plain = engines
    for question in QUESTIONS:
        prompt = SYSTEM + question
        want = generate(plain, [prompt], GREEDY)[0]
        first, _ = one(cached, prompt)
        again, n_again = one(cached, prompt)
        assert first == want and again == want
        assert n_again == (len(prompt) - 2) // 16 * 16   # whole blocks, two tokens re-read
    # the system prompt was found by the later questions
    assert cached.prefix_cache.stats.hits >= len(QUESTIONS) + 1


def first_logits(engine, prompt, monkeypatch) -> tuple[np.ndarray, int]:
    """The logits either engine samples the first token of ``prompt`` from, and how many
    prompt tokens came from the cache."""
    import edge_agent.engine.batch as batch_module
    import edge_agent.engine.ort_loop as ort_module

    seen: list[np.ndarray] = []

    def recording(seq, logits, rng):
        seen.append(np.array(logits))
        return int(np.argmax(logits))

    with monkeypatch.context() as patch:
        for module in (batch_module, ort_module):
            patch.setattr(module, "pick", recording)
        _, cached = one(engine, prompt, SamplingParams(max_tokens=1, temperature=0.0))
    assert len(seen) == 1
    return seen[0], cached


@pytest.mark.parametrize("question", QUESTIONS, ids=lambda q: f"{150 + len(q)}-tokens")
def test_a_hit_gives_the_same_logits_bit_for_bit(tiny_genai_bundle, tiny_optimum_bundle,
                                                 question, monkeypatch):
    """Greedy ties aside: the first token's logits after a hit are exactly those without."""
    for kind, bundle in (("genai", tiny_genai_bundle), ("optimum", tiny_optimum_bundle)):
        engine = make(kind, bundle)
        try:
            miss, _ = first_logits(engine, SYSTEM + question, monkeypatch)
            hit, n = first_logits(engine, SYSTEM + question, monkeypatch)
            assert n > 0
            assert np.array_equal(miss, hit), kind
        finally:
            engine.close()


def test_cached_tokens_counts_the_shared_head_in_whole_blocks(engines):
    cached, _ = engines
    one(cached, SYSTEM + QUESTIONS[0])
    _, n = one(cached, SYSTEM + QUESTIONS[1])
    assert n == len(SYSTEM) // 16 * 16
    _, n = one(cached, [7, 7, 7] + SYSTEM)   # a different start shares nothing
    assert n == 0


def test_tenants_do_not_share_entries(engines):
    cached, plain = engines
    prompt = SYSTEM + QUESTIONS[1]
    want = generate(plain, [prompt], GREEDY)[0]
    assert one(cached, prompt, salt="alice")[1] == 0
    assert one(cached, prompt, salt="bob") == (want, 0)
    assert one(cached, prompt)[1] == 0                  # no salt is a tenant of its own
    assert one(cached, prompt, salt="alice") == (want, (len(prompt) - 2) // 16 * 16)


def test_the_budget_holds_and_old_entries_make_room(engines):
    cached, _ = engines
    one(cached, SYSTEM + QUESTIONS[0])
    block_bytes = cached.prefix_cache.bytes // len(cached.prefix_cache)
    small = make("genai" if isinstance(cached, BatchEngine) else "optimum", cached.bundle,
                 cache_mb=4 * block_bytes / 2**20)        # room for 4 blocks
    try:
        one(small, SYSTEM + QUESTIONS[0])
        assert len(small.prefix_cache) == 4 and small.prefix_cache.bytes <= 4 * block_bytes
        other = [int(t) for t in RNG.integers(100, 40_000, 80)]
        one(small, other)
        assert small.prefix_cache.bytes <= small.prefix_cache.budget_bytes
        assert one(small, other)[1] == 64                  # the newest is kept ...
        assert one(small, SYSTEM + QUESTIONS[0])[1] == 0   # ... the oldest made room
        assert small.prefix_cache.stats.evicted_blocks >= 4
    finally:
        small.close()


def test_clearing_the_cache_mid_request_changes_nothing(tiny_genai_bundle):
    engine = make("genai", tiny_genai_bundle)
    try:
        prompt = SYSTEM + QUESTIONS[0]
        want, _ = one(engine, prompt)
        seq = engine.start(prompt, GREEDY)
        first = engine.step([seq])[0]        # placed from the cache, the prompt's rest read
        assert isinstance(first, int)
        seq.generated.append(first)
        engine.prefix_cache.clear()
        while len(seq.generated) < GREEDY.max_tokens:
            seq.generated.append(engine.step([seq])[0])
        assert seq.cached_tokens > 0 and seq.generated == want
        engine.release(seq)
    finally:
        engine.close()


def test_a_finished_conversation_is_reread_when_idle(tiny_genai_bundle):
    engine = make("genai", tiny_genai_bundle)
    plain = make("genai", tiny_genai_bundle, cache_mb=0)
    try:
        history = SYSTEM + QUESTIONS[0]
        reply, _ = one(engine, history, SamplingParams(max_tokens=40, temperature=0.0,
                                                       ignore_eos=True))
        assert engine.has_idle_work()
        while engine.has_idle_work():
            engine.idle_step()
        turn2 = history + reply + QUESTIONS[1]
        got, n = one(engine, turn2)
        # the reply's blocks were re-read by prefill runs: found, and exact
        assert n == len(history + reply[:-1]) // 16 * 16 > len(history)
        assert got == generate(plain, [turn2], GREEDY)[0]
    finally:
        engine.close()
        plain.close()


def test_a_request_interrupts_the_reread_and_keeps_what_it_read(tiny_genai_bundle):
    engine = make("genai", tiny_genai_bundle)
    try:
        history = [int(t) for t in RNG.integers(100, 40_000, 300)]
        one(engine, history[:40], SamplingParams(max_tokens=2, temperature=0.0))
        engine._reread.append((history, None, engine.prefix_cache.epoch))
        engine.idle_step()                   # one chunk of the 300 tokens
        assert engine.has_idle_work()
        _, n = one(engine, history[:100])  # a request comes: the re-read stops
        assert not engine.has_idle_work() and n >= 32
    finally:
        engine.close()


def test_a_long_prompt_is_read_in_chunks_while_others_decode(tiny_genai_bundle):
    engine = make("genai", tiny_genai_bundle, cache_mb=0)
    plain = make("genai", tiny_genai_bundle, cache_mb=0)
    try:
        running = decoding(engine, QUESTIONS[1])
        long = engine.start([int(t) for t in RNG.integers(100, 40_000, 600)], GREEDY)
        steps_without_first_token = 0
        while not long.generated:
            got_running, got_long = engine.step([running, long])
            assert isinstance(got_running, int)   # the running sequence gets a token every step
            running.generated.append(got_running)
            if got_long is None:
                steps_without_first_token += 1
            else:
                long.generated.append(got_long)
        assert steps_without_first_token >= 2      # the 600 tokens took several steps
        assert long.generated == generate(plain, [long.prompt_ids], GREEDY)[0][:1]
        engine.release(running)
        engine.release(long)
    finally:
        engine.close()
        plain.close()


def test_a_reset_leaves_no_entry_of_a_request_admitted_before_it(tiny_genai_bundle):
    engine = make("genai", tiny_genai_bundle)
    try:
        running = decoding(engine, QUESTIONS[1])
        long = engine.start(SYSTEM + QUESTIONS[0], GREEDY)
        assert engine.step([running, long])[1] is None    # its first chunk is read
        engine.prefix_cache.request_reset()               # e.g. from the admin endpoint
        while not long.generated:
            got_running, got_long = engine.step([running, long])
            running.generated.append(got_running)
            if got_long is not None:
                long.generated.append(got_long)
        engine.release(running)
        engine.release(long)
        while engine.has_idle_work():
            engine.idle_step()                            # the re-read is dropped too
        assert len(engine.prefix_cache) == 0
        assert one(engine, SYSTEM + QUESTIONS[0])[1] == 0
    finally:
        engine.close()


def test_a_reset_requested_while_a_reread_is_placed_leaves_no_entry(tiny_genai_bundle,
                                                                    monkeypatch):
    """The race a loaded CI machine found: the idle re-read of a conversation from before a
    reset, placed just as the reset is requested (the reset is applied by its own lookup),
    must not fill the cache under the new epoch."""
    engine = make("genai", tiny_genai_bundle)
    try:
        one(engine, SYSTEM + QUESTIONS[0], SamplingParams(max_tokens=40, temperature=0.0,
                                                          ignore_eos=True))
        assert engine.has_idle_work()
        epoch = engine.prefix_cache.epoch
        start = engine.start

        def start_then_reset(*args, **kwargs):            # between the queue and the place
            seq = start(*args, **kwargs)
            engine.prefix_cache.request_reset()
            return seq
        monkeypatch.setattr(engine, "start", start_then_reset)
        while engine.has_idle_work():
            engine.idle_step()
        assert engine.prefix_cache.epoch == epoch + 1      # the reset was applied
        assert len(engine.prefix_cache) == 0
    finally:
        engine.close()


def test_a_short_prompt_left_for_the_next_step_is_still_read_whole(tiny_genai_bundle):
    """Short prompts beyond a step's 256 tokens are placed and left: the next step reads
    the first of them whole, not in chunks."""
    engine = make("genai", tiny_genai_bundle, cache_mb=0)
    try:
        running = decoding(engine, QUESTIONS[2])
        shorts = [engine.start([int(t) for t in RNG.integers(100, 40_000, 60)], GREEDY)
                  for _ in range(6)]               # 60 tokens each: 4 fit behind the first
        got = engine.step([running, *shorts])
        assert [isinstance(t, int) for t in got] == [True] * 6 + [False]
        assert shorts[5].data.index >= 0 and shorts[5].data.length == 0
        running.generated.append(got[0])
        for seq, token in zip(shorts, got[1:6]):
            seq.generated.append(token)
        engine.chunk_tps, engine.decode_s = 100.0, 0.01   # rates that make chunks of 4 tokens
        got = engine.step([running, *shorts])
        assert all(isinstance(t, int) for t in got)  # the last one too, read whole
        for seq in (running, *shorts):
            engine.release(seq)
    finally:
        engine.close()


def test_the_row_a_sequence_left_is_taken_only_where_prefill_read_it(tiny_genai_bundle,
                                                                    monkeypatch):
    """The next sequence placed takes the row the last one left, and skips copying the
    cached blocks the row already holds. The row's reply positions were computed by decode
    runs, not prefill: where the cache holds those tokens from a prefill, its copy is used."""
    engine = make("genai", tiny_genai_bundle)
    plain = make("genai", tiny_genai_bundle, cache_mb=0)
    try:
        reply = generate(plain, [SYSTEM], SamplingParams(max_tokens=20, temperature=0.0,
                                                         ignore_eos=True))[0]
        one(engine, SYSTEM + reply, SamplingParams(max_tokens=1, temperature=0.0))
        assert one(engine, SYSTEM, SamplingParams(max_tokens=20, temperature=0.0,
                                                  ignore_eos=True))[0] == reply
        # the row now holds SYSTEM (prefill) then the reply (decode); the cache holds both
        # read by prefill; block 9 (positions 144-160) straddles the two
        turn = SYSTEM + reply + QUESTIONS[0]
        got = first_logits(engine, turn, monkeypatch)[0]
        assert engine.rows == [] and len(engine.prefix_cache.lookup(turn, None)) >= 10
        assert np.array_equal(got, first_logits(plain, turn, monkeypatch)[0])
    finally:
        engine.close()
        plain.close()


def test_a_grown_kv_buffer_leaves_no_row_to_take(tiny_genai_bundle, monkeypatch):
    """A prompt longer than the buffer's positions grows it, and only the active rows move to
    the new one: the row the last sequence left is gone, its blocks come from the cache."""
    engine = make("genai", tiny_genai_bundle)
    plain = make("genai", tiny_genai_bundle, cache_mb=0)
    try:
        one(engine, SYSTEM + QUESTIONS[0])
        capacity = engine.kv.shape[3]
        longer = SYSTEM + QUESTIONS[0] + [int(t) for t in RNG.integers(100, 40_000, capacity)]
        got = first_logits(engine, longer, monkeypatch)[0]
        assert engine.kv.shape[3] > capacity
        assert np.array_equal(got, first_logits(plain, longer, monkeypatch)[0])
    finally:
        engine.close()
        plain.close()


def test_a_short_prompt_beside_decoding_is_read_in_one_step(tiny_genai_bundle):
    """A device's question, or a chat turn whose history is cached, gets its first token
    from the step that places it; a long prompt is still read in chunks (test above)."""
    engine = make("genai", tiny_genai_bundle)
    plain = make("genai", tiny_genai_bundle, cache_mb=0)
    try:
        one(engine, SYSTEM + QUESTIONS[1])        # the history a later turn sends again
        running = decoding(engine, QUESTIONS[2])
        for prompt in (QUESTIONS[1], SYSTEM + QUESTIONS[0]):
            short = engine.start(prompt, GREEDY)
            got_running, got_short = engine.step([running, short])
            assert isinstance(got_running, int) and isinstance(got_short, int)
            running.generated.append(got_running)
            assert got_short == generate(plain, [prompt], GREEDY)[0][0]
            engine.release(short)
        engine.release(running)
    finally:
        engine.close()
        plain.close()


def test_short_prompts_arriving_together_are_read_in_one_step(tiny_genai_bundle):
    """Requests that arrive together decode together: the short prompts behind the first are
    read in its step (up to MAX_PREFILL tokens); a long one behind them waits for a later
    step, and the running sequence gets its token in every step."""
    engine = make("genai", tiny_genai_bundle, cache_mb=0)
    plain = make("genai", tiny_genai_bundle, cache_mb=0)
    try:
        running = decoding(engine, QUESTIONS[2])
        shorts = [engine.start(q, GREEDY) for q in QUESTIONS]
        long = engine.start([int(t) for t in RNG.integers(100, 40_000, 300)], GREEDY)
        got = engine.step([running, *shorts, long])
        assert isinstance(got[0], int)
        assert got[1:-1] == [generate(plain, [q], GREEDY)[0][0] for q in QUESTIONS]
        assert got[-1] is None and long.data.length == 0      # placed, not read yet
        for seq in (running, *shorts, long):
            engine.release(seq)
    finally:
        engine.close()
        plain.close()
