"""The scheduler on a fake engine (plain data, no model): batching, limits, cancellation."""

from __future__ import annotations

import asyncio
import threading


from edge_agent.engine import GenerationEngine, SamplingParams, SequenceState
from edge_agent.scheduler import Scheduler


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

    def start(self, prompt_ids, params):
        return SequenceState(prompt_ids=list(prompt_ids), params=params)

    def step(self, seqs):
        self.gate.wait(10)
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


def test_max_tokens_gives_length_and_eos_gives_stop():
    async def go():
        s = Scheduler(CountingEngine(eos_after=3), max_concurrency=2, queue_size=2)
        try:
            a = s.try_submit([10], SamplingParams(max_tokens=2))
            b = s.try_submit([20], SamplingParams(max_tokens=10))
            return await _collect(a), await _collect(b)
        finally:
            s.close()
    (ta, fa), (tb, fb) = run(go())
    assert (ta, fa) == ([11, 12], "length")
    assert (tb, fb) == ([21, 22, 23], "stop")  # EOS itself is not emitted


def test_context_length_caps_generation():
    async def go():
        s = Scheduler(CountingEngine(context_length=8), max_concurrency=1, queue_size=0)
        try:
            return await _collect(s.try_submit([1, 2, 3, 4, 5], SamplingParams(max_tokens=100)))
        finally:
            s.close()
    tokens, finish = run(go())
    assert len(tokens) == 3 and finish == "length"


def test_sequences_are_decoded_together_up_to_max_concurrency():
    async def go():
        engine = CountingEngine()
        s = Scheduler(engine, max_concurrency=3, queue_size=5)
        engine.gate.clear()
        try:
            handles = [s.try_submit([i * 100], SamplingParams(max_tokens=5)) for i in range(5)]
            await asyncio.sleep(0.2)
            engine.gate.set()
            results = await asyncio.gather(*(_collect(h) for h in handles))
            return engine.batches, results
        finally:
            s.close()
    batches, results = run(go())
    assert max(batches) == 3
    assert all(f == "length" and len(t) == 5 for t, f in results)


def test_full_queue_refuses_and_cancel_frees_the_slot():
    async def go():
        engine = CountingEngine()
        s = Scheduler(engine, max_concurrency=1, queue_size=1)
        try:
            a = s.try_submit([1], SamplingParams(max_tokens=10_000_000))
            b = s.try_submit([2], SamplingParams(max_tokens=1))
            assert s.full() and s.try_submit([3], SamplingParams(max_tokens=1)) is None
            a.cancel()
            tb, fb = await _collect(b)
            assert fb == "length"
            await asyncio.wait_for(s.drain(10), 15)
            assert s.inflight == 0 and not s.full()
        finally:
            s.close()
    run(go())
