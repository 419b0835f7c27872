"""Admission and decoding of concurrent sequences: a bounded queue and one asyncio task.

Requests wait in a FIFO queue of ``queue_size``; up to ``max_concurrency`` sequences are
decoded together, one engine step for all of them per iteration (continuous batching at
the scheduler level: a finished sequence's slot is refilled at the next step). Cancelling a
handle (client gone, stop string seen) frees its slot before the next step.

Two decisions here are about speed at batch 1 on a small node, where onnxruntime's intra-op
threads already occupy every core and anything else the agent does per token comes out of
decode speed (measured on 2 cores; benchmarks/README.md):

- Where a step runs. Short decode steps run on the event loop itself: no cross-thread
  wake-up and GIL hand-over per token (measured 1-2 % faster than a worker thread). Steps
  that would hold the loop long run in a worker thread (onnxruntime releases the GIL), so
  health checks and new requests are still answered: every step that prefills a prompt, and
  decode steps once they take longer than ``INLINE_STEP_S``.
- How often streams run. A sequence's first token is handed over at once (time to first
  token is what a user feels); after that the scheduler yields to the event loop every
  ``stream_interval`` seconds rather than after every step, and each stream sends the tokens
  that waited in one write. Every token is still its own SSE event; the node saves a loop
  pass, a socket write and a client wake-up per token (3-8 % faster at 20 ms than at 0).

When nothing is queued or running, the engine may do short pieces of background work
(``idle_step``: re-reading finished conversations into the prefix cache); a request that
arrives meanwhile waits for at most one piece.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from dataclasses import dataclass

from edge_agent.engine.base import (
    GenerationEngine,
    SamplingParams,
    SequenceState,
    TokenLogprob,
)
from edge_agent.errors import AgentError

log = logging.getLogger(__name__)

# Decode steps faster than this run on the event loop (no per-token thread hand-off); the
# loop is then never blocked longer than this by decoding.
INLINE_STEP_S = 0.025
RETRY_AFTER_MAX_S = 60


def failure_message(exc: BaseException) -> str:
    """What a client is told when its generation failed: the agent's own errors say what
    went wrong; anything else is a bug, logged with its traceback and not shown."""
    if isinstance(exc, AgentError):
        log.error("generation failed", extra={"error": str(exc)})
        return str(exc)
    log.error("generation failed", exc_info=exc)
    return "internal error"


async def wait_for_event(event: asyncio.Event, timeout: float) -> bool:
    """Wait for ``event``; False if ``timeout`` seconds passed first."""
    try:
        await asyncio.wait_for(event.wait(), max(0.0, timeout))
    except TimeoutError:
        return event.is_set()
    return True


def retry_after_s(slot_s: float, max_concurrency: int) -> int:
    """Seconds a refused client should wait: when the queue is full, a place opens as soon as
    the next running sequence finishes, one of ``max_concurrency`` that each hold a slot for
    ``slot_s`` on average (0 while nothing has finished yet). Whole seconds, as HTTP's
    Retry-After takes, from 1 to ``RETRY_AFTER_MAX_S``."""
    return min(RETRY_AFTER_MAX_S, max(1, math.ceil(slot_s / max(1, max_concurrency))))


@dataclass(frozen=True)
class TokenEvent:
    """One item a handle yields: a token id, or the end (finish_reason / error set)."""

    token_id: int | None = None
    finish_reason: str | None = None   # "stop" | "length" | "cancelled" | "error"
    error: str | None = None
    logprob: TokenLogprob | None = None  # the token's, when the request asked for logprobs


class SequenceHandle:
    """A submitted request: iterate it for TokenEvents; cancel() to give up its slot."""

    def __init__(self, prompt_ids: list[int], params: SamplingParams,
                 cache_salt: str | None = None, constraint=None):
        self.prompt_ids = prompt_ids
        self.params = params
        self.cache_salt = cache_salt
        self.constraint = constraint   # grammar.Constraint, or None
        self.events: asyncio.Queue[TokenEvent] = asyncio.Queue()
        self.cancelled = False
        self.state: SequenceState | None = None
        self.submitted = time.monotonic()
        self.admitted = self.submitted   # when it got a decoding slot

    def cancel(self) -> None:
        self.cancelled = True

    def _emit(self, event: TokenEvent) -> None:
        self.events.put_nowait(event)

    async def __aiter__(self):
        while True:
            event = await self.events.get()
            yield event
            if event.token_id is None:
                return


class Scheduler:
    """Queue and step sequences on ``engine``. Use it from one event loop only."""

    def __init__(self, engine: GenerationEngine, *, max_concurrency: int, queue_size: int,
                 stream_interval: float = 0.0):
        self.engine = engine
        self.stream_interval = max(0.0, stream_interval)
        self.max_concurrency = max(1, max_concurrency)
        self.queue_size = max(0, queue_size)
        self.waiting: deque[SequenceHandle] = deque()
        self.running: list[SequenceHandle] = []
        self.decode_step_s = 0.0   # moving average of decode-step time
        self.slot_s = 0.0          # moving average of how long a finished sequence ran
        self._task: asyncio.Task | None = None
        self._wakeup: asyncio.Event | None = None
        self._closed = False
        self._yielded_at = 0.0     # when the streams last ran
        self._idle = asyncio.Event()  # nothing queued or running (drain waits on it)
        self._idle.set()

    @property
    def queue_depth(self) -> int:
        return len(self.waiting)

    @property
    def inflight(self) -> int:
        return len(self.running) + len(self.waiting)

    def full(self) -> bool:
        return self.room() == 0

    def retry_after_s(self) -> int:
        return retry_after_s(self.slot_s, self.max_concurrency)

    def room(self) -> int:
        """How many more sequences may be queued now."""
        return max(0, self.max_concurrency + self.queue_size - self.inflight)

    def try_submit(self, prompt_ids: list[int], params: SamplingParams, *,
                   cache_salt: str | None = None, constraint=None) -> SequenceHandle | None:
        """Queue a sequence; None when the queue is full (the caller answers 429).
        ``constraint`` (a grammar.Constraint) masks every token it picks."""
        if self.full():
            return None
        handle = SequenceHandle(prompt_ids, params, cache_salt, constraint)
        if self._closed:
            handle._emit(TokenEvent(finish_reason="error", error="the model was unloaded"))
            return handle
        self.waiting.append(handle)
        self._idle.clear()
        if self._task is None or self._task.done():
            # started lazily: the model may be loaded before the event loop runs
            self._wakeup = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._run(),
                                                                name="edgegen-scheduler")
        self._wakeup.set()
        return handle

    async def drain(self, timeout: float) -> bool:
        """Wait until nothing is queued or running; False if ``timeout`` passed first."""
        return await wait_for_event(self._idle, timeout)

    def _note_idle(self) -> None:
        if not self.running and not self.waiting:
            self._idle.set()

    async def close(self) -> None:
        """Stop after the step in progress; what is still queued or running ends in an error."""
        self._closed = True
        if self._task is not None:
            self._wakeup.set()
            await self._task
        for handle in [*self.running, *self.waiting]:
            if handle.state is not None:
                self.engine.release(handle.state)
            handle._emit(TokenEvent(finish_reason="error", error="the model was unloaded"))
        self.running.clear()
        self.waiting.clear()
        self._note_idle()

    # -- the stepping task ------------------------------------------------------------------

    async def _run(self) -> None:
        try:
            await self._steps()
        except Exception:  # a bug here must end the requests, not leave them waiting forever
            log.exception("scheduler failed")
            for handle in [*self.running, *self.waiting]:
                handle._emit(TokenEvent(finish_reason="error", error="internal scheduler error"))
            self.running.clear()
            self.waiting.clear()
            self._note_idle()

    async def _steps(self) -> None:
        while not self._closed:
            self._admit()
            if not self.running:
                self._wakeup.clear()
                if self.engine.has_idle_work():
                    await asyncio.to_thread(self.engine.idle_step)
                else:
                    await self._wakeup.wait()
                continue
            batch = list(self.running)
            states = [h.state for h in batch]
            prefill = any(not s.generated for s in states)
            started = time.perf_counter()
            try:
                if prefill or self.decode_step_s > INLINE_STEP_S:
                    tokens = await asyncio.to_thread(self.engine.step, states)
                else:
                    tokens = self.engine.step(states)
            except Exception as exc:  # noqa: BLE001 - the whole step failed (the batched
                # forward pass): every sequence in it ends, the scheduler goes on
                message = failure_message(exc)
                for handle in batch:
                    self._finish(handle, TokenEvent(finish_reason="error", error=message))
                continue
            if not prefill:
                took = time.perf_counter() - started
                self.decode_step_s = took if not self.decode_step_s else \
                    0.8 * self.decode_step_s + 0.2 * took
            for handle, token in zip(batch, tokens):
                if token is None:  # its prompt is still being read (chunked prefill)
                    continue
                if isinstance(token, Exception):  # this sequence failed on its own
                    self._finish(handle, TokenEvent(finish_reason="error",
                                                    error=failure_message(token)))
                else:
                    self._advance(handle, token)
            now = time.monotonic()
            if prefill or now - self._yielded_at >= self.stream_interval \
                    or len(self.running) < len(batch):
                # a first token, a finished sequence, or tokens waiting long enough: let the
                # streams send them (and the loop take new requests)
                self._yielded_at = now
                await asyncio.sleep(0)
                # a second pass with no new token queued: anyio (Starlette's streaming
                # response) cancels a stream whose client left only while the stream waits
                # on an empty queue, and after one pass it would always see a token waiting
                # (inline steps never leave the loop idle), so a gone client's generation
                # ran to its end
                await asyncio.sleep(0)

    def _admit(self) -> None:
        for handle in [h for h in self.running if h.cancelled]:
            self._finish(handle, TokenEvent(finish_reason="cancelled"))
        for handle in [h for h in self.waiting if h.cancelled]:
            self.waiting.remove(handle)
            handle._emit(TokenEvent(finish_reason="cancelled"))
        while self.waiting and len(self.running) < self.max_concurrency:
            handle = self.waiting.popleft()
            try:
                handle.state = self.engine.start(handle.prompt_ids, handle.params,
                                                 cache_salt=handle.cache_salt)
                handle.state.constraint = handle.constraint
            except Exception as exc:  # noqa: BLE001 - one request's failure is its own
                handle._emit(TokenEvent(finish_reason="error", error=failure_message(exc)))
                continue
            handle.admitted = time.monotonic()
            self.running.append(handle)
        self._note_idle()

    def _finish(self, handle: SequenceHandle, event: TokenEvent) -> None:
        self.running.remove(handle)
        if event.finish_reason in ("stop", "length"):
            took = time.monotonic() - handle.admitted
            self.slot_s = took if not self.slot_s else 0.8 * self.slot_s + 0.2 * took
        if handle.state is not None:
            self.engine.release(handle.state)
        handle._emit(event)
        self._note_idle()

    def _advance(self, handle: SequenceHandle, token: int) -> None:
        state = handle.state
        state.generated.append(token)
        params = handle.params
        # a grammar's end is always the end: it allows nothing but EOS after it
        if token in self.engine.eos_token_ids and (not params.ignore_eos or handle.constraint):
            self._finish(handle, TokenEvent(finish_reason="stop"))
            return
        logprob = state.logprobs[-1] if params.logprobs is not None else None
        handle._emit(TokenEvent(token_id=token, logprob=logprob))
        total = len(state.prompt_ids) + len(state.generated)
        if len(state.generated) >= params.max_tokens or total >= self.engine.context_length:
            self._finish(handle, TokenEvent(finish_reason="length"))
