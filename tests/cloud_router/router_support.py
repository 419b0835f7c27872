"""Small real upstreams for the router's tests: FastAPI apps served by uvicorn on free ports,
each behaving as told (answer, fail, stream, break), and the router itself on a real socket."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from dataclasses import dataclass, field

import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from cloud_router.app import build_app
from cloud_router.endpoints import Endpoint
from cloud_router.server import front_server
from cloud_router.settings import RouterSettings
from tests.support.procs import free_port, wait_http


def quiet_config(app, host: str, port: int) -> uvicorn.Config:
    return uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on")


class ServerThread:
    """A server for ``app`` on 127.0.0.1:<free port>, in a daemon thread."""

    def __init__(self, app, port: int | None = None, server=None):
        """``server(app, host, port)``: what serves it (default uvicorn; the router: its own
        server, as `edgegen router` serves it)."""
        self.port = port or free_port()
        self.server = (server or (lambda *a: uvicorn.Server(quiet_config(*a))))(
            app, "127.0.0.1", self.port)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("test server did not start")
            time.sleep(0.01)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(15)


@dataclass
class Upstream:
    """A fake agent. ``mode``: ok | 500 | 429 | break (stream breaks after 2 events) | other
    (streams other words: a replay that cannot join) | garbage (200, an HTML page) | cut (200,
    JSON cut short) | slow (ok, half a second late)."""

    node: str
    tier: str = "edge"
    region: str = ""
    model: str = "tiny"
    mode: str = "ok"
    max_concurrency: int = 0
    hits: int = 0
    streams: dict = field(default_factory=dict)   # request id -> "completed" | "cancelled"
    resumed: list = field(default_factory=list)   # the text each continuation was asked for
    report: str | None = None   # its ORCA load report, sent to whoever asks for one
    server: ServerThread | None = None

    @property
    def endpoint(self) -> Endpoint:
        service = "edgegen-edge" if self.tier == "edge" else "edgegen-central"
        return Endpoint(id=f"{service}-{self.node}-{self.server.port}", service=service,
                        node=self.node, address="127.0.0.1", port=self.server.port,
                        tier=self.tier, model=self.model, region=self.region,
                        max_concurrency=self.max_concurrency)

    def app(self) -> FastAPI:
        app = FastAPI()

        @app.post("/v1/chat/completions")
        async def chat(request: Request):
            self.hits += 1
            body = await request.json()
            headers = {"x-edgegen-node": self.node, "x-edgegen-tier": self.tier}
            if self.report and request.headers.get("endpoint-load-metrics-format") == "TEXT":
                headers["endpoint-load-metrics"] = self.report
            if self.mode == "500":
                return JSONResponse({"error": {"message": "boom", "type": "server_error",
                                               "param": None, "code": None}}, 500, headers)
            if self.mode == "429":
                return JSONResponse({"error": {"message": "busy", "type": "rate_limit",
                                               "param": None, "code": None}}, 429,
                                    {**headers, "retry-after": "1"})
            if self.mode == "slow":   # answers, half a second late
                await asyncio.sleep(0.5)
            if self.mode == "garbage":
                return Response(b"<html>proxy error</html>", 200, media_type="text/html")
            if self.mode == "cut":
                return Response(b'{"id": "c1", "choices": [', 200, media_type="application/json")
            if body.get("model") != self.model:
                return JSONResponse({"error": {"message": "unknown model", "type":
                                               "invalid_request_error", "param": "model",
                                               "code": "model_not_found"}}, 404, headers)
            if not body.get("stream"):
                return JSONResponse({"id": "c1", "object": "chat.completion", "model":
                                     self.model, "node": self.node, "choices": [{
                                         "index": 0, "finish_reason": "stop", "message": {
                                             "role": "assistant", "content": "hi"}}]},
                                    headers=headers)
            n = int(body.get("max_tokens") or 5)
            delay = float(body.get("delay", 0.0))
            rid = body.get("user") or f"r{self.hits}"
            mode = self.mode
            # The router continuing a stream that broke elsewhere: the final assistant message
            # holds the words sent so far; go on from there, in a stream of its own id that
            # opens with a role chunk, as the agent does.
            first, sid = 0, rid
            if request.headers.get("x-edgegen-resume") == "1" \
                    and body.get("continue_final_message"):
                first, sid = len(body["messages"][-1]["content"].split()), f"{rid}@{self.node}"
                self.resumed.append(body["messages"][-1]["content"])

            def chunk(delta: dict, finish: str | None = None) -> str:
                return "data: " + json.dumps({
                    "id": sid, "created": 1000 + self.hits, "object": "chat.completion.chunk",
                    "model": self.model, "choices": [{"index": 0, "delta": delta,
                                                      "finish_reason": finish}]}) + "\n\n"

            async def events():
                self.streams[rid] = "started"
                try:
                    if first:
                        yield chunk({"role": "assistant", "content": ""})
                    for i in range(first, n):
                        if mode == "break" and i == 2:
                            raise RuntimeError("the agent died mid-stream")
                        yield chunk({"content": f"{'u' if mode == 'other' else 't'}{i} "})
                        if await request.is_disconnected():
                            self.streams[rid] = "cancelled"
                            return
                        await asyncio.sleep(delay)
                    yield chunk({}, "stop")
                    if (body.get("stream_options") or {}).get("include_usage"):
                        yield "data: " + json.dumps({
                            "id": sid, "created": 1000 + self.hits, "choices": [],
                            "object": "chat.completion.chunk", "model": self.model,
                            "usage": {"prompt_tokens": 3, "completion_tokens": n,
                                      "total_tokens": 3 + n}}) + "\n\n"
                    yield "data: [DONE]\n\n"
                    self.streams[rid] = "completed"
                except asyncio.CancelledError:
                    self.streams[rid] = "cancelled"
                    raise

            return StreamingResponse(events(), media_type="text/event-stream", headers=headers)

        return app


@pytest.fixture(scope="module")
def upstreams():
    ups = {
        "eu": Upstream("eu-1", region="eu-west"),
        "eu2": Upstream("eu-2", region="eu-west"),
        "us": Upstream("us-1", region="us-east"),
        "central": Upstream("gpu-1", tier="central", region="eu-central"),
    }
    for u in ups.values():
        u.server = ServerThread(u.app())
    yield ups
    for u in ups.values():
        u.server.stop()


@pytest.fixture
def fleet(upstreams):
    """The endpoints a router starts with (tests edit it before `start_router`); upstreams
    reset to healthy."""
    for u in upstreams.values():
        u.mode, u.hits, u.report = "ok", 0, None
        u.streams.clear()
        u.resumed.clear()
    return [u.endpoint for u in upstreams.values()]


class EndpointList:
    """A list of endpoints as the router's source: ``set`` replaces it and reports the change
    (moves the generation), as a discovery watcher does."""

    def __init__(self, endpoints=()):
        self._endpoints = list(endpoints)
        self.generation = 0

    @property
    def endpoints(self) -> list[Endpoint]:
        return list(self._endpoints)

    def set(self, endpoints) -> None:
        self._endpoints = list(endpoints)
        self.generation += 1


def router_server(app, host: str, port: int):
    """The router's own server, as `edgegen router` serves it."""
    return front_server(app, host, port, install_signals=False)


def start_router(fleet: list[Endpoint], **settings) -> ServerThread:
    """The router over ``fleet`` (copied); change what it sees with ``router.source.set``."""
    source = EndpointList(fleet)
    app = build_app(RouterSettings(**settings), [source])
    router = ServerThread(app, server=router_server)
    wait_http(router.url + "/healthz")
    router.app, router.source = app, source
    return router


@pytest.fixture
def router(fleet):
    r = start_router(fleet)
    yield r
    r.stop()
