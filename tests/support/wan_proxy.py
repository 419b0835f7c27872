"""A TCP proxy that puts distance on loopback: every byte is delivered a fixed one-way delay
after it arrived, in each direction, so a local fleet can have edges 5, 40 and 120 ms away.

Delays are per direction and do not limit bandwidth (bytes queue with their due time and a
writer delivers them when due), so a request/response costs one round trip (2 × delay) on a
kept-alive connection, as on a real WAN. A refused or dropped upstream closes the client's
side, as a dead host behind a real network would (after its delay).

    with WanProxy(("127.0.0.2", port), ("127.0.0.1", port), delay_ms=40):
        ...
"""

from __future__ import annotations

import asyncio
import threading
import time


class WanProxy:
    def __init__(self, listen: tuple[str, int], target: tuple[str, int],
                 delay_ms: float = 0.0, up_ms: float | None = None):
        self.listen, self.target = listen, target
        self.down_s = delay_ms / 1000          # target → client
        self.up_s = (delay_ms if up_ms is None else up_ms) / 1000  # client → target
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.base_events.Server | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self.connections = 0

    # --- lifecycle (a thread with its own event loop, so sync tests can use it) ---
    def start(self) -> "WanProxy":
        self._thread = threading.Thread(target=self._run, daemon=True, name="wan-proxy")
        self._thread.start()
        if not self._ready.wait(10) or self._server is None:
            raise RuntimeError(f"WAN proxy could not listen on {self.listen}")
        return self

    def stop(self) -> None:
        """Close the listener and every proxied connection."""
        if self._loop and self._loop.is_running():
            asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop)
        if self._thread:
            self._thread.join(10)

    async def _shutdown(self) -> None:
        self._server.close()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        asyncio.get_running_loop().stop()

    def __enter__(self) -> "WanProxy":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _run(self) -> None:
        self._loop = asyncio.new_event_loop()
        try:
            self._server = self._loop.run_until_complete(asyncio.start_server(
                self._handle, *self.listen, reuse_address=True))
        except OSError:
            self._ready.set()
            return
        self._ready.set()
        try:
            self._loop.run_forever()
        finally:
            self._server.close()
            self._loop.close()

    # --- the proxy itself ---
    async def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter):
        try:
            await self._proxy(client_r, client_w)
        except asyncio.CancelledError:
            pass  # shutting down (asyncio's server callback would report a cancelled task)

    async def _proxy(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter):
        self.connections += 1
        try:
            up_r, up_w = await asyncio.open_connection(*self.target)
        except OSError:
            await asyncio.sleep(self.up_s + self.down_s)  # the refusal travels back too
            client_w.close()
            return
        try:
            await asyncio.gather(_pipe(client_r, up_w, self.up_s),
                                 _pipe(up_r, client_w, self.down_s), return_exceptions=True)
        finally:
            for w in (client_w, up_w):
                w.close()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                delay_s: float) -> None:
    """Copy reader → writer, each chunk delivered ``delay_s`` after it was read."""
    queue: asyncio.Queue = asyncio.Queue()

    async def deliver() -> None:
        while True:
            due, data = await queue.get()
            wait = due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            if data is None:
                if writer.can_write_eof():
                    writer.write_eof()
                return
            writer.write(data)
            await writer.drain()

    sender = asyncio.ensure_future(deliver())
    try:
        while data := await reader.read(65536):
            queue.put_nowait((time.monotonic() + delay_s, data))
        queue.put_nowait((time.monotonic() + delay_s, None))
        await sender
    except (ConnectionError, OSError):
        pass
    finally:
        sender.cancel()
        # a connection reset on one side resets the other (after the delay), as a dead
        # host does; closing the writer here lets the other pipe see it
        writer.close()
