"""The router's own pages through the ASGI app, for the front (``cloud_router.front``): one
request's exchange (the body in one message, a disconnect once the client goes away, the
answer written whole or chunk by chunk), and the app's lifespan (startup, shutdown).

Only what the router's FastAPI pages use: HTTP, no WebSocket, no lifespan state."""

from __future__ import annotations

import asyncio
import logging

from cloud_router.exchange import Reply, Request, json_reply
from cloud_router.protocol import error_body

log = logging.getLogger(__name__)


class AsgiExchange:
    """One request through the ASGI app: the body in one message, then a disconnect once
    the client goes away; the answer written whole, or chunk by chunk if the app streams.
    ``conn``: the front's connection (``cloud_router.front.Connection``), which writes."""

    def __init__(self, conn, request: Request, keep: bool):
        self.conn, self.request, self.keep = conn, request, keep
        self.status = 0
        self.headers: list = []
        self.started = self.chunked = self.finished = False
        self.received = False

    async def run(self, app) -> bool:
        r, conn = self.request, self.conn
        scope = {
            "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": r.http_version, "method": r.method, "scheme": "http",
            "path": r.path, "raw_path": r.raw_path, "query_string": r.query,
            "root_path": "", "headers": r.headers,
            "client": conn.transport.get_extra_info("peername"),
            "server": conn.transport.get_extra_info("sockname"),
        }
        try:
            await app(scope, self.receive, self.send)
        except Exception:
            log.exception("request failed", extra={"path": r.path})
            if not self.started:
                conn.write_whole(json_reply(500, error_body(500, "internal error")), False)
            return False
        if not self.started:
            conn.write_whole(json_reply(500, error_body(500, "no answer")), False)
            return False
        return self.keep and self.finished

    async def receive(self) -> dict:
        if not self.received:
            self.received = True
            return {"type": "http.request", "body": self.request.body, "more_body": False}
        await self.conn.left
        return {"type": "http.disconnect"}

    async def send(self, message: dict) -> None:
        conn = self.conn
        if message["type"] == "http.response.start":
            self.started, self.status = True, message["status"]
            self.headers = [(k.lower(), v) for k, v in message.get("headers", [])]
            return
        if message["type"] != "http.response.body" or self.finished or conn.left.done():
            return
        body, more = message.get("body", b""), message.get("more_body", False)
        head_only = self.request.method == "HEAD"   # the head a GET would get, no body
        if not self.chunked and not more:   # the usual case: the whole answer at once
            self.finished = True
            if head_only:
                has_length = any(k == b"content-length" for k, _ in self.headers)
                conn.write(conn.head(self.status, self.headers if has_length else [
                    *self.headers, (b"content-length", str(len(body)).encode())], self.keep))
            else:
                conn.write_whole(Reply(self.status, [
                    (k, v) for k, v in self.headers if k != b"content-length"], body), self.keep)
            return
        if not self.chunked:
            self.chunked = True
            conn.write(conn.head(
                self.status, [*self.headers, (b"transfer-encoding", b"chunked")], self.keep))
        if not head_only and body:
            conn.write_chunk(body)
        if not more:
            self.finished = True
            if not head_only:   # not even the last chunk: an answer to HEAD has no body
                conn.write_chunk(b"")
        if conn.writable is not None:
            await conn.writable


class Lifespan:
    """The ASGI lifespan protocol: the app's startup before serving, its shutdown after."""

    def __init__(self, app):
        self.app = app
        self.events: asyncio.Queue = asyncio.Queue()
        self.replies: asyncio.Queue = asyncio.Queue()
        self.task: asyncio.Task | None = None

    async def startup(self) -> None:
        self.task = asyncio.create_task(self.app({"type": "lifespan", "asgi": {
            "version": "3.0"}, "state": {}}, self.events.get, self.replies.put))
        await self._step("lifespan.startup")

    async def shutdown(self) -> None:
        await self._step("lifespan.shutdown")
        await self.task

    async def _step(self, event: str) -> None:
        await self.events.put({"type": event})
        waiting = asyncio.ensure_future(self.replies.get())
        await asyncio.wait((waiting, self.task), return_when=asyncio.FIRST_COMPLETED)
        if not waiting.done():
            waiting.cancel()
            self.task.result()   # the app raised: raise it here
            raise RuntimeError(f"the app ended without answering {event}")
        reply = waiting.result()
        if reply["type"].endswith(".failed"):
            raise RuntimeError(f"{event} failed: {reply.get('message', '')}")
