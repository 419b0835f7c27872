"""The scheduler on a fake engine (plain data, no model): batching, limits, cancellation, where
steps run (event loop or worker thread) and how often streams are handed their tokens."""

from __future__ import annotations

import asyncio
import contextlib
import math
import threading
import time

import pytest
from edge_agent.engine.base import GenerationEngine, SamplingParams, SequenceState
from edge_agent.errors import GenerationError
from edge_agent.scheduler import INLINE_STEP_S, RETRY_AFTER_MAX_S, Scheduler, retry_after_s


class CountingEngine(GenerationEngine):
    """Emits prompt[-1]+1, +2, ...; emits EOS (0) after ``eos_after`` tokens if set."""

    def __init__(self, eos_after: int | None = None, context_length: int = 64):
        self.tokenizer = None
        self.context_length = context_length
        self.eos_token_ids = frozenset({0})
        self.eos_after = eos_after
        self.batches: list[int] = []
        self.gate = threading.Event()
        self.gate.set()
        self.threads: list[tuple[bool, str]] = []   # (prefill step?, thread that ran it)
        self.prefill_s = 0.0
        self.decode_s = 0.0

    def start(self, prompt_ids, params, *, cache_salt=None):
        return SequenceState(prompt_ids=list(prompt_ids), params=params)

    def step(self, seqs):
        self.gate.wait(10)
        prefill = any(not s.generated for s in seqs)
        self.threads.append((prefill, threading.current_thread().name))
        time.sleep(self.prefill_s if prefill else self.decode_s)
        self.batches.append(len(seqs))
        out = []
        for s in seqs:
            n = len(s.generated)
            out.append(0 if self.eos_after is not None and n >= self.eos_after
                       else s.prompt_ids[-1] + n + 1)
        return out


async def _collect(handle):
    tokens, finish = [], None
    async for ev in handle:
        if ev.token_id is not None:
            tokens.append(ev.token_id)
        else:
            finish = ev.finish_reason
    return tokens, finish


def run(coro):
    return asyncio.run(coro)


@contextlib.asynccontextmanager
async def scheduling(engine: GenerationEngine, **options):
    """A scheduler on ``engine`` for the block, closed after it."""
    s = Scheduler(engine, **options)
    try:
        yield s
    finally:
        await s.close()


def test_max_tokens_gives_length_and_eos_gives_stop():
    async def go():
        async with scheduling(CountingEngine(eos_after=3), max_concurrency=2, queue_size=2) as s:
            a = s.try_submit([10], SamplingParams(max_tokens=2))
            b = s.try_submit([20], SamplingParams(max_tokens=10))
            return await _collect(a), await _collect(b)
    (ta, fa), (tb, fb) = run(go())
    assert (ta, fa) == ([11, 12], "length")
    assert (tb, fb) == ([21, 22, 23], "stop")  # EOS itself is not emitted


def test_context_length_caps_generation():
    async def go():
        engine = CountingEngine(context_length=8)
        async with scheduling(engine, max_concurrency=1, queue_size=0) as s:
            return await _collect(s.try_submit([1, 2, 3, 4, 5], SamplingParams(max_tokens=100)))
    tokens, finish = run(go())
    assert len(tokens) == 3 and finish == "length"


def test_sequences_are_decoded_together_up_to_max_concurrency():
    async def go():
        engine = CountingEngine()
        engine.gate.clear()
        async with scheduling(engine, max_concurrency=3, queue_size=5) as s:
            handles = [s.try_submit([i * 100], SamplingParams(max_tokens=5)) for i in range(5)]
            await asyncio.sleep(0.2)
            engine.gate.set()
            results = await asyncio.gather(*(_collect(h) for h in handles))
            return engine.batches, results
    batches, results = run(go())
    assert max(batches) == 3
    assert all(f == "length" and len(t) == 5 for t, f in results)


def test_full_queue_refuses_and_cancel_frees_the_slot():
    async def go():
        engine = CountingEngine()
        async with scheduling(engine, max_concurrency=1, queue_size=1) as s:
            a = s.try_submit([1], SamplingParams(max_tokens=10_000_000))
            b = s.try_submit([2], SamplingParams(max_tokens=1))
            assert s.full() and s.try_submit([3], SamplingParams(max_tokens=1)) is None
            a.cancel()
            tb, fb = await _collect(b)
            assert fb == "length"
            await asyncio.wait_for(s.drain(10), 15)
            assert s.inflight == 0 and not s.full()
    run(go())


@pytest.mark.parametrize("slot_s, concurrency, expected", [
    (0.0, 4, 1),       # nothing finished yet
    (0.8, 8, 1),       # a place opens within the second
    (10.0, 2, 5),
    (10.1, 2, 6),      # rounded up: a client back too early is refused again
    (900.0, 1, RETRY_AFTER_MAX_S),
    (3.0, 0, 3),
])
def test_retry_after_is_when_the_next_running_sequence_should_finish(slot_s, concurrency,
                                                                      expected):
    assert retry_after_s(slot_s, concurrency) == expected


def test_retry_after_follows_how_long_sequences_hold_their_slot():
    async def go():
        engine = CountingEngine()
        engine.decode_s = 0.05
        async with scheduling(engine, max_concurrency=1, queue_size=0) as s:
            assert s.retry_after_s() == 1
            tokens, finish = await _collect(s.try_submit([1], SamplingParams(max_tokens=30)))
            assert finish == "length"
            return s.slot_s, s.retry_after_s()
    slot_s, retry = run(go())
    assert 1.3 < slot_s < 5 and retry == math.ceil(slot_s)


def test_decode_steps_run_on_the_loop_and_prefills_in_a_worker_thread():
    async def go():
        engine = CountingEngine()
        async with scheduling(engine, max_concurrency=1, queue_size=0) as s:
            await _collect(s.try_submit([1], SamplingParams(max_tokens=4)))
        return engine.threads
    loop_thread = threading.current_thread().name
    steps = run(go())
    assert steps[0][0] and steps[0][1] != loop_thread          # the prefill: off the loop
    assert [t for _, t in steps[1:]] == [loop_thread] * 3       # short decode steps: on it


def test_the_loop_answers_during_a_long_prefill_and_slow_decode_steps_leave_it():
    async def go():
        engine = CountingEngine()
        engine.prefill_s = 0.5
        async with scheduling(engine, max_concurrency=1, queue_size=0) as s:
            handle = s.try_submit([1], SamplingParams(max_tokens=6))
            await asyncio.sleep(0.05)
            t0 = time.monotonic()
            await asyncio.sleep(0.01)                 # e.g. a health check meanwhile
            waited = time.monotonic() - t0
            engine.decode_s = 2 * INLINE_STEP_S       # decode steps now too slow for the loop
            await _collect(handle)
        return waited, engine.threads
    waited, steps = run(go())
    assert waited < 0.25                              # not stuck behind the 0.5 s prefill
    loop_thread = threading.current_thread().name
    # the first slow decode step runs on the loop; once measured slow, they move off it
    assert steps[-1][1] != loop_thread and steps[-2][1] != loop_thread


@pytest.mark.parametrize("interval, expected", [(0.0, [1, 1, 1, 1, 1]), (30.0, [1, 4])])
def test_stream_interval_hands_over_tokens_in_batches_but_the_first_at_once(interval, expected):
    """How many tokens a stream finds waiting each time it wakes: with an interval longer
    than the whole generation, the first token comes alone, the rest together at the end."""
    async def go():
        async with scheduling(CountingEngine(), max_concurrency=1, queue_size=0,
                              stream_interval=interval) as s:
            handle = s.try_submit([1], SamplingParams(max_tokens=5))
            seen, tokens = [], 0
            while tokens < 5:
                event = await handle.events.get()
                batch = 1 + sum(1 for e in handle.events._queue if e.token_id is not None)
                for _ in range(batch - 1):
                    handle.events.get_nowait()
                seen.append(batch)
                tokens += batch
            return seen
    assert run(go()) == expected


def test_close_ends_what_is_queued_and_running_with_an_error():
    async def go():
        engine = CountingEngine()
        engine.prefill_s = 0.2
        s = Scheduler(engine, max_concurrency=1, queue_size=1)
        running = s.try_submit([1], SamplingParams(max_tokens=1_000_000))
        queued = s.try_submit([2], SamplingParams(max_tokens=3))
        await asyncio.sleep(0.05)                     # the prefill is in its worker thread
        await s.close()                               # waits for that step, then stops
        ends = []
        for h in (running, queued):
            async for event in h:
                if event.token_id is None:
                    ends.append((event.finish_reason, event.error))
        late = s.try_submit([3], SamplingParams(max_tokens=1))
        return ends, [e async for e in late]
    ends, late = run(go())
    assert ends == [("error", "the model was unloaded")] * 2
    assert late[-1].finish_reason == "error"


# --- fault isolation: one request's failure is its own ------------------------------------------

class FragileEngine(CountingEngine):
    """Like CountingEngine, but a prompt ending in 13 fails where ``fails_in`` says: when it is
    admitted ("start"), or in its own work during a step ("step": a per-sequence error)."""

    def __init__(self, fails_in: str):
        super().__init__()
        self.fails_in = fails_in

    def start(self, prompt_ids, params, *, cache_salt=None):
        if self.fails_in == "start" and prompt_ids[-1] == 13:
            raise ValueError("expected non-negative integer")  # numpy's, from a bad seed
        return super().start(prompt_ids, params)

    def step(self, seqs):
        tokens = super().step(seqs)
        if self.fails_in == "step":
            return [GenerationError("sampler: probabilities contain NaN")
                    if s.prompt_ids[-1] == 13 else t for s, t in zip(seqs, tokens)]
        return tokens


@pytest.mark.parametrize("fails_in, message", [("start", "internal error"),
                                               ("step", "probabilities contain NaN")])
def test_one_requests_failure_ends_it_alone(fails_in, message):
    engine = FragileEngine(fails_in)

    async def scenario():
        async with scheduling(engine, max_concurrency=4, queue_size=4) as s:
            ok_before = s.try_submit([100], SamplingParams(max_tokens=5))
            bad = s.try_submit([13], SamplingParams(max_tokens=5))
            ok_after = s.try_submit([200], SamplingParams(max_tokens=5))
            results = await asyncio.gather(*map(_collect_with_error, (ok_before, bad, ok_after)))
            later = await _collect(s.try_submit([300], SamplingParams(max_tokens=2)))
            return results, later

    (before, bad, after), later = run(scenario())
    assert before == ([101, 102, 103, 104, 105], "length", None)
    assert after == ([201, 202, 203, 204, 205], "length", None)
    assert bad[1] == "error" and message in bad[2]
    assert later == ([301, 302], "length")


def test_a_failed_step_ends_its_batch_and_the_scheduler_serves_on():
    engine = CountingEngine()
    calls = {"n": 0}
    step = engine.step

    def failing_once(seqs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise GenerationError("onnxruntime: the batched run failed")
        return step(seqs)

    engine.step = failing_once

    async def scenario():
        async with scheduling(engine, max_concurrency=4, queue_size=4) as s:
            first = await _collect_with_error(s.try_submit([1], SamplingParams(max_tokens=5)))
            second = await _collect(s.try_submit([50], SamplingParams(max_tokens=3)))
            return first, second

    first, second = run(scenario())
    assert first[1] == "error" and "batched run failed" in first[2]
    assert second == ([51, 52, 53], "length")


async def _collect_with_error(handle):
    tokens, finish, error = [], None, None
    async for ev in handle:
        if ev.token_id is not None:
            tokens.append(ev.token_id)
        else:
            finish, error = ev.finish_reason, ev.error
    return tokens, finish, error
