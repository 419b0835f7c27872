"""The agent's HTTP limits over real sockets: a body over the limit is refused unread (413), a
body that does not come is refused after the read timeout (408), and a request head that does
not come closes the connection (slowloris); a well-behaved client is served as before."""

from __future__ import annotations

import contextlib
import socket
import threading
import time

import httpx
import pytest
import uvicorn
from fastapi import FastAPI, Request

from edge_agent.rest.limits import BodyLimit, head_timeout_protocol
from tests.support.procs import free_port

LIMIT = 1024


@contextlib.contextmanager
def serving(read_timeout: float = 5.0, head_timeout: float = 5.0):
    app = FastAPI()

    @app.post("/echo")
    async def echo(request: Request):
        return {"bytes": len(await request.body())}

    app.add_middleware(BodyLimit, max_bytes=LIMIT, read_timeout=read_timeout)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, port=port, log_config=None,
                                           http=head_timeout_protocol(head_timeout)))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    try:
        yield port
    finally:
        server.should_exit = True
        thread.join(10)


def _raw(port: int, data: bytes, wait: float = 5.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=wait) as sock:
        sock.sendall(data)
        chunks = []
        with contextlib.suppress(TimeoutError, ConnectionResetError):
            while chunk := sock.recv(4096):
                chunks.append(chunk)
        return b"".join(chunks)


def test_bodies_within_the_limit_pass_and_bigger_ones_are_413():
    with serving() as port:
        url = f"http://127.0.0.1:{port}/echo"
        assert httpx.post(url, content=b"x" * LIMIT).json() == {"bytes": LIMIT}
        r = httpx.post(url, content=b"x" * (LIMIT + 1))
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

        def chunked():  # no Content-Length: refused as soon as it grows past the limit
            for _ in range(100):
                yield b"y" * 512

        r = httpx.post(url, content=chunked())
        assert r.status_code == 413 and r.json()["error"]["type"] == "invalid_request_error"


def test_a_huge_content_length_is_refused_before_the_body_is_sent():
    with serving() as port:
        started = time.monotonic()
        answer = _raw(port, b"POST /echo HTTP/1.1\r\nhost: x\r\ncontent-length: 99999999999\r\n\r\n",
                      wait=3)
        assert answer.startswith(b"HTTP/1.1 413") and time.monotonic() - started < 2


def test_a_body_that_never_comes_is_408_after_the_read_timeout():
    with serving(read_timeout=0.5) as port:
        started = time.monotonic()
        answer = _raw(port, b"POST /echo HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\nabc")
        took = time.monotonic() - started
        assert answer.startswith(b"HTTP/1.1 408") and 0.4 < took < 3, (answer[:80], took)


@pytest.mark.parametrize("partial", [b"", b"POST /ec", b"POST /echo HTTP/1.1\r\nhost: x\r\n"])
def test_a_request_head_that_never_completes_is_closed(partial):
    with serving(head_timeout=0.5) as port:
        started = time.monotonic()
        answer = _raw(port, partial)
        took = time.monotonic() - started
        assert answer == b"" and 0.4 < took < 3, (answer, took)
        assert httpx.post(f"http://127.0.0.1:{port}/echo", content=b"ok").status_code == 200


def test_keep_alive_clients_are_not_cut_between_quick_requests():
    with serving(head_timeout=0.5) as port, httpx.Client() as client:
        for _ in range(4):
            assert client.post(f"http://127.0.0.1:{port}/echo", content=b"a").status_code == 200
            time.sleep(0.2)
