"""A reference point for `benchmarks/router.py --part overhead`: how fast a Python proxy can
forward at all on this machine, and what the router's own per-request decisions cost on top.

Not part of edgegen. A bare reverse proxy on the router's stack (uvloop, httptools' C
parser) that forwards every request to one upstream over a keep-alive pool, with no timers,
retries, streams, limits or error handling: callbacks only, no coroutine per request. It
stands for the cheapest data path Python could have.

With ``--router-logic`` it also makes, for each request, the decisions the router makes for it,
with the router's own code over a one-endpoint table (the benchmark's case): decode and check
the JSON body, hash the prompt's prefixes, the hints, the retry budget, the policy's choice,
the endpoint's stats, the affinity table and the metrics. What that adds is what the
router's logic costs with no data path overhead at all.

    python benchmarks/python_floor.py --port P --upstream-port U [--router-logic]
                                      [--reuse-port]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import sys
import time
from pathlib import Path

import httptools
import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cloud_router.affinity import prefix_keys  # noqa: E402
from cloud_router.app import build_app  # noqa: E402
from cloud_router.endpoints import EDGE_SERVICE, Endpoint  # noqa: E402
from cloud_router.proxy import hints_for, read_request  # noqa: E402
from cloud_router.settings import RouterSettings  # noqa: E402

UPSTREAM_HOST = "127.0.0.1"


class RouterLogic:
    """The router's per-request decisions, with its own modules (``cloud_router``)."""

    def __init__(self, upstream_port: int, model: str):
        class Source:
            generation = 1
            endpoints = (Endpoint(id=f"{EDGE_SERVICE}-standin-{upstream_port}",
                                  service=EDGE_SERVICE, node="standin", address=UPSTREAM_HOST,
                                  port=upstream_port, region="eu-west", model=model),)

        app = build_app(RouterSettings(), [Source()])
        self.settings, self.table, self.metrics = app.settings, app.table, app.metrics

    def before(self, path: str, headers: list[tuple[bytes, bytes]], body: bytes):
        h = {k.decode("latin-1"): v.decode("latin-1") for k, v in headers}
        payload, model = read_request(body)
        table = self.table
        if not table.known_model(model):
            raise ValueError(model)
        hints = hints_for(self.settings, model, h.get("x-edgegen-region"),
                          h.get("x-edgegen-zone"), h.get("x-edgegen-location"),
                          prefix_keys(path, payload))
        table.budget.request(table.clock())
        decision = table.choose(hints, set())
        table.stats.started(decision.endpoint.id)
        return decision, hints, time.monotonic()

    def after(self, state) -> bytes:
        decision, hints, start = state
        ep, took = decision.endpoint, time.monotonic() - start
        self.table.stats.succeeded(ep.id, took * 1000)
        self.table.stats.finished(ep.id)
        self.metrics.upstream_seconds(ep.id, took)
        self.metrics.count(ep.tier, "ok")
        self.table.affinity.record(hints.prefix, ep.id)
        return b"x-edgegen-route: " + decision.reason.encode() + b"\r\n"


class Upstream(asyncio.Protocol):
    def __init__(self, idle: list):
        self.idle, self.client, self.transport = idle, None, None
        self.parser = httptools.HttpResponseParser(self)
        self.headers: list = []
        self.body: list = []

    def connection_made(self, transport) -> None:
        self.transport = transport

    def connection_lost(self, exc) -> None:
        if self in self.idle:
            self.idle.remove(self)

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_message_begin(self) -> None:
        self.headers, self.body = [], []

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() not in (b"content-length", b"connection", b"keep-alive"):
            self.headers.append(name + b": " + value + b"\r\n")

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        client, self.client = self.client, None
        self.idle.append(self)
        client.answer(self.parser.get_status_code(), self.headers, b"".join(self.body))


class Client(asyncio.Protocol):
    def __init__(self, proxy: Proxy):
        self.proxy, self.transport = proxy, None
        self.parser = httptools.HttpRequestParser(self)
        self.url, self.headers, self.body, self.state = b"", [], [], None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_message_begin(self) -> None:
        self.url, self.headers, self.body = b"", [], []

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.lower(), value))

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        body = b"".join(self.body)
        logic = self.proxy.logic
        if logic is not None:
            self.state = logic.before(self.url.decode("latin-1"), self.headers, body)
        self.proxy.send(self, b"POST %s HTTP/1.1\r\nhost: %s\r\ncontent-type: application/json"
                        b"\r\ncontent-length: %d\r\n\r\n%s" % (self.url, UPSTREAM_HOST.encode(),
                                                              len(body), body))

    def answer(self, status: int, headers: list[bytes], body: bytes) -> None:
        extra = self.proxy.logic.after(self.state) if self.proxy.logic is not None else b""
        if not self.transport.is_closing():
            self.transport.write(b"HTTP/1.1 %d OK\r\n%s%scontent-length: %d\r\n\r\n%s" % (
                status, b"".join(headers), extra, len(body), body))


class Proxy:
    def __init__(self, upstream_port: int, logic: RouterLogic | None):
        self.upstream_port, self.logic = upstream_port, logic
        self.idle: list[Upstream] = []

    def send(self, client: Client, request: bytes) -> None:
        if self.idle:
            upstream = self.idle.pop()
            upstream.client = client
            upstream.transport.write(request)
        else:
            asyncio.get_running_loop().create_task(self._connect(client, request))

    async def _connect(self, client: Client, request: bytes) -> None:
        _, upstream = await asyncio.get_running_loop().create_connection(
            lambda: Upstream(self.idle), UPSTREAM_HOST, self.upstream_port)
        upstream.client = client
        upstream.transport.write(request)


async def serve(port: int, proxy: Proxy, reuse_port: bool) -> None:
    loop = asyncio.get_running_loop()
    await loop.create_server(lambda: Client(proxy), "127.0.0.1", port, backlog=2048,
                             reuse_port=reuse_port or None)
    await asyncio.Event().wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--upstream-port", type=int, required=True)
    ap.add_argument("--router-logic", action="store_true",
                    help="make the router's per-request decisions too")
    ap.add_argument("--model", default="standin-model")
    ap.add_argument("--reuse-port", action="store_true",
                    help="SO_REUSEPORT: several of these on one port, as router workers are")
    args = ap.parse_args()
    logic = RouterLogic(args.upstream_port, args.model) if args.router_logic else None
    gc.freeze()   # as the router does
    uvloop.run(serve(args.port, Proxy(args.upstream_port, logic), args.reuse_port))


if __name__ == "__main__":
    main()
