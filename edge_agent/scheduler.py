"""Admission and decoding of concurrent sequences: a bounded queue in front of one worker thread.

Requests wait in a FIFO queue of ``queue_size``; up to ``max_concurrency`` sequences are
decoded together, one engine step for all of them per iteration (continuous batching at
the scheduler level: a finished sequence's slot is refilled at the next step). The worker
thread runs the engine (onnxruntime releases the GIL while it computes), and hands every
token to the request's asyncio queue on the event loop. Cancelling a handle (client gone,
stop string seen) frees its slot before the next step.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass

from edge_agent.engine import GenerationEngine, SamplingParams, SequenceState
from edge_agent.errors import AgentError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TokenEvent:
    """One item a handle yields: a token id, or the end (finish_reason / error set)."""

    token_id: int | None = None
    finish_reason: str | None = None   # "stop" | "length" | "cancelled"
    error: str | None = None


class SequenceHandle:
    """A submitted request: iterate it for TokenEvents; cancel() to give up its slot."""

    def __init__(self, prompt_ids: list[int], params: SamplingParams,
                 loop: asyncio.AbstractEventLoop):
        self.prompt_ids = prompt_ids
        self.params = params
        self.loop = loop
        self.events: asyncio.Queue[TokenEvent] = asyncio.Queue()
        self.cancelled = False
        self.state: SequenceState | None = None
        self.submitted = time.monotonic()

    def cancel(self) -> None:
        self.cancelled = True

    def _emit(self, event: TokenEvent) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)

    async def __aiter__(self):
        while True:
            event = await self.events.get()
            yield event
            if event.token_id is None:
                return


class Scheduler:
    def __init__(self, engine: GenerationEngine, *, max_concurrency: int, queue_size: int):
        self.engine = engine
        self.max_concurrency = max(1, max_concurrency)
        self.queue_size = max(0, queue_size)
        self.waiting: deque[SequenceHandle] = deque()
        self.running: list[SequenceHandle] = []
        self._cond = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="edgegen-scheduler", daemon=True)
        self._thread.start()

    @property
    def queue_depth(self) -> int:
        return len(self.waiting)

    @property
    def inflight(self) -> int:
        return len(self.running) + len(self.waiting)

    def full(self) -> bool:
        return self.inflight >= self.max_concurrency + self.queue_size

    def try_submit(self, prompt_ids: list[int], params: SamplingParams) -> SequenceHandle | None:
        """Queue a sequence; None when the queue is full (the caller answers 429)."""
        handle = SequenceHandle(prompt_ids, params, asyncio.get_running_loop())
        with self._cond:
            if self.full():
                return None
            self.waiting.append(handle)
            self._cond.notify()
        return handle

    async def drain(self, timeout: float) -> bool:
        """Wait until nothing is queued or running; False if ``timeout`` passed first."""
        deadline = time.monotonic() + timeout
        while self.inflight:
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.05)
        return True

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify()
        self._thread.join(timeout=30)
        for handle in [*self.running, *self.waiting]:
            handle._emit(TokenEvent(finish_reason="cancelled", error="the model was unloaded"))
        self.running.clear()
        self.waiting.clear()

    # -- worker thread --------------------------------------------------------------------

    def _admit(self) -> None:
        for handle in [h for h in self.running if h.cancelled]:
            self._finish(handle, TokenEvent(finish_reason="cancelled"))
        for handle in [h for h in self.waiting if h.cancelled]:
            self.waiting.remove(handle)
            handle._emit(TokenEvent(finish_reason="cancelled"))
        while self.waiting and len(self.running) < self.max_concurrency:
            handle = self.waiting.popleft()
            try:
                handle.state = self.engine.start(handle.prompt_ids, handle.params)
            except AgentError as exc:
                handle._emit(TokenEvent(finish_reason="error", error=str(exc)))
                continue
            self.running.append(handle)

    def _finish(self, handle: SequenceHandle, event: TokenEvent) -> None:
        self.running.remove(handle)
        if handle.state is not None:
            self.engine.release(handle.state)
        handle._emit(event)

    def _loop(self) -> None:
        while True:
            with self._cond:
                self._admit()
                while not self.running and not self._stop:
                    self._cond.wait()
                    self._admit()
                if self._stop:
                    return
                batch = list(self.running)
            try:
                tokens = self.engine.step([h.state for h in batch])
            except AgentError as exc:
                log.error("generation failed", extra={"error": str(exc)})
                with self._cond:
                    for handle in batch:
                        self._finish(handle, TokenEvent(finish_reason="error", error=str(exc)))
                continue
            with self._cond:
                for handle, token in zip(batch, tokens):
                    self._advance(handle, token)

    def _advance(self, handle: SequenceHandle, token: int) -> None:
        state = handle.state
        state.generated.append(token)
        params = handle.params
        if token in self.engine.eos_token_ids and not params.ignore_eos:
            self._finish(handle, TokenEvent(finish_reason="stop"))
            return
        handle._emit(TokenEvent(token_id=token))
        total = len(state.prompt_ids) + len(state.generated)
        if len(state.generated) >= params.max_tokens or total >= self.engine.context_length:
            self._finish(handle, TokenEvent(finish_reason="length"))
