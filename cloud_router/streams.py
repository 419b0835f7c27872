"""An upstream's SSE answer on its way to the client: whole events at a time, and, for a
resumable chat stream, continued on another endpoint when its edge breaks (the forwarder
supplies how: ``resume``; ``cloud_router.resume`` the rules)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

from cloud_router.endpoints import Endpoint
from cloud_router.protocol import sse_error_event
from cloud_router.resume import DONE, Diverged, Transcript, split_events
from cloud_router.upstream import UpstreamError

log = logging.getLogger(__name__)

# What a broken upstream raises: connection errors, read timeouts, an answer that is not HTTP.
TRANSPORT_ERRORS = (UpstreamError, asyncio.TimeoutError)


class UpstreamStream:
    """An upstream SSE answer on its way to the client, whole events at a time.

    The sender iterates ``events()`` and then calls ``close(delivered)`` exactly once, however
    the sending ended: that releases the upstream response and counts the outcome.

    With a ``transcript`` (a resumable chat stream), a break is followed by ``resume``, which
    continues the generation on another endpoint; its events then pass through
    ``transcript.rewrite`` into the same stream. Without one, or when no endpoint can
    continue, the stream ends with an OpenAI error event.
    """

    def __init__(self, endpoint: Endpoint, first: bytes, rest: AsyncIterator[bytes],
                 on_break: Callable[[Endpoint, BaseException], None],
                 on_lost: Callable[[Endpoint], None],
                 on_close: Callable[[str | None], Awaitable[None]],
                 transcript: Transcript | None = None,
                 resume: Callable[[Transcript], Awaitable[UpstreamStream | None]] | None = None):
        self.endpoint = endpoint
        self._first, self._rest = first, rest
        self._on_break, self._on_lost, self._on_close = on_break, on_lost, on_close
        self.transcript, self._resume = transcript, resume
        self.broken = False
        self._continued = False   # the events come from a continuation: rewrite them

    async def events(self) -> AsyncIterator[bytes]:
        t = self.transcript
        while True:
            try:
                async for block in self._blocks():
                    out = self._pass_on(block)
                    if out:
                        yield out
                return
            except TRANSPORT_ERRORS as exc:
                broke, cause = self.endpoint, exc
            except Diverged as exc:   # the replay cannot join what the client has
                log.warning("stream resumption diverged", extra={"endpoint": self.endpoint.id,
                                                                 "why": str(exc)})
                self.broken = True
                self._on_lost(self.endpoint)
                yield sse_error_event(f"the stream could not be resumed exactly: {exc}")
                return
            self._on_break(broke, cause)
            if t is not None and t.finished:   # all but the end went out: end it here
                if not t.done:
                    yield DONE
                return
            following = await self._resume(t) if t is not None and self._resume else None
            if following is None:
                self.broken = True
                self._on_lost(broke)
                yield sse_error_event(
                    f"the stream from {broke.node} broke: {type(cause).__name__}")
                return
            await self._on_close(None)   # the broken upstream's: released, not counted
            self.endpoint, self._first, self._rest = (following.endpoint, following._first,
                                                      following._rest)
            self._on_close, self._continued = following._on_close, True

    async def _blocks(self) -> AsyncIterator[bytes]:
        """The upstream's bytes cut at event ends (a partial event waits for its end)."""
        buf, self._first = self._first, b""
        while True:
            cut = _last_event_end(buf)
            if cut:
                yield buf[:cut]
                buf = buf[cut:]
            try:
                buf += await self._rest.__anext__()
            except StopAsyncIteration:
                break
        if buf:
            yield buf

    def _pass_on(self, block: bytes) -> bytes:
        t = self.transcript
        if t is None:
            return block
        if not self._continued:
            for event in split_events(block):
                t.record(event)
            return block
        return b"".join(t.rewrite(event) for event in split_events(block))

    async def close(self, delivered: bool) -> None:
        """``delivered``: the client got the stream to its end (False: it left)."""
        await self._on_close(None if self.broken else "ok" if delivered else "cancelled")


_EVENT_ENDS = (b"\r\n\r\n", b"\n\n", b"\r\r")


def _last_event_end(buf: bytes) -> int:
    """Index just past the last complete SSE event in ``buf`` (0 if none is complete)."""
    best = 0
    for sep in _EVENT_ENDS:
        i = buf.rfind(sep)
        if i >= 0:
            best = max(best, i + len(sep))
    return best
