"""The router's own HTTP/1.1 server (``cloud_router.front``) over raw sockets: what uvicorn
gave the router before, kept (deadlines, limits, malformed requests, keep-alive, pipelining,
HTTP/1.0, ``Expect: 100-continue``), each refusal counted in the router's metrics."""

from __future__ import annotations

import json
import socket
import time

import httpx
import pytest

from cloud_router.app import build_app
from cloud_router.front import FrontConfig, FrontServer
from cloud_router.settings import RouterSettings
from tests.cloud_router.router_support import (  # noqa: F401 (fixtures)
    EndpointList,
    ServerThread,
    fleet,
    upstreams,
)
from tests.support.procs import wait_http

LIMIT = 4096
CHAT = json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}).encode()


@pytest.fixture
def front(fleet):
    app = build_app(RouterSettings(max_body_bytes=LIMIT), [EndpointList(fleet)])
    config = FrontConfig(max_body_bytes=LIMIT, head_timeout_s=0.5, body_timeout_s=0.5)
    server = ServerThread(app, server=lambda a, host, port: FrontServer(
        a, host, port, config, install_signals=False))
    wait_http(server.url + "/healthz")
    yield server
    server.stop()


def _connect(server) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port), timeout=10)


def _read_all(sock: socket.socket) -> bytes:
    """Everything until the server closes the connection."""
    out = b""
    while chunk := sock.recv(65536):
        out += chunk
    return out


def _answers(raw: bytes) -> list[tuple[int, dict, bytes]]:
    """The HTTP/1.1 answers in ``raw`` (Content-Length bodies), in order."""
    out = []
    while raw:
        head, _, rest = raw.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = dict(line.lower().split(": ", 1) for line in lines[1:])
        n = int(headers.get("content-length", "0"))
        out.append((int(lines[0].split()[1]), headers, rest[:n]))
        raw = rest[n:]
    return out


def _post(body: bytes, extra: bytes = b"") -> bytes:
    return (b"POST /v1/chat/completions HTTP/1.1\r\nhost: r\r\ncontent-type: application/json"
            b"\r\nx-edgegen-region: eu-west\r\n" + extra
            + b"content-length: %d\r\n\r\n" % len(body) + body)


def _refused(server, outcome: str) -> float:
    text = httpx.get(server.url + "/metrics").text
    line = f'edgegen_router_requests_total{{outcome="{outcome}",tier="none"}} '
    return next((float(x.split()[-1]) for x in text.splitlines() if x.startswith(line)), 0.0)


def test_pipelined_requests_are_answered_in_order_on_one_connection(front):
    with _connect(front) as sock:
        sock.sendall(_post(CHAT) + b"GET /healthz HTTP/1.1\r\nhost: r\r\n\r\n" + _post(CHAT)
                     + b"GET /healthz HTTP/1.1\r\nhost: r\r\nconnection: close\r\n\r\n")
        answers = _answers(_read_all(sock))
    assert [a[0] for a in answers] == [200, 200, 200, 200]
    assert json.loads(answers[0][2])["object"] == "chat.completion"
    assert json.loads(answers[1][2]) == {"status": "ok"}
    assert answers[2][1]["x-edgegen-node"] in ("eu-1", "eu-2")
    assert answers[3][1]["connection"] == "close"


def test_http_1_0_gets_its_answer_and_the_connection_closes(front):
    with _connect(front) as sock:
        sock.sendall(_post(CHAT).replace(b"HTTP/1.1", b"HTTP/1.0", 1))
        ((status, headers, body),) = _answers(_read_all(sock))
    assert status == 200 and headers["connection"] == "close"
    assert json.loads(body)["object"] == "chat.completion"


def test_expect_100_continue_is_answered_before_the_body(front):
    with _connect(front) as sock:
        head, _, body = _post(CHAT, b"expect: 100-continue\r\n").partition(b"\r\n\r\n")
        sock.sendall(head + b"\r\n\r\n")
        assert sock.recv(4096) == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(body)
        status = int(sock.recv(65536).split()[1])
    assert status == 200


def test_an_answer_to_head_is_the_head_alone_and_the_connection_goes_on(front):
    """The router's pages take GET only: HEAD is a 405, its head without the JSON body."""
    with _connect(front) as sock:
        sock.sendall(b"HEAD /healthz HTTP/1.1\r\nhost: r\r\n\r\n"
                     b"GET /healthz HTTP/1.1\r\nhost: r\r\nconnection: close\r\n\r\n")
        raw = _read_all(sock)
    head, _, rest = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 405 ") and b"content-length: " in head
    ((status, _headers, body),) = _answers(rest)   # right after the head: no body between
    assert status == 200 and json.loads(body) == {"status": "ok"}


class _StreamingPage:
    """A front handler whose every request goes to an ASGI app that streams its answer."""

    def native(self, method: str, path: str) -> bool:
        return False

    def refused(self, status: int) -> None:
        pass

    async def asgi(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            while True:
                event = (await receive())["type"]
                await send({"type": event + ".complete"})
                if event == "lifespan.shutdown":
                    return
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": b"one ", "more_body": True})
        await send({"type": "http.response.body", "body": b"two"})


def test_a_streamed_page_goes_out_chunked_and_its_answer_to_head_has_no_chunk():
    server = ServerThread(_StreamingPage(), server=lambda h, host, port: FrontServer(
        h, host, port, install_signals=False))
    try:
        with _connect(server) as sock:
            sock.sendall(b"HEAD / HTTP/1.1\r\nhost: r\r\n\r\n"
                         b"GET / HTTP/1.1\r\nhost: r\r\nconnection: close\r\n\r\n")
            raw = _read_all(sock)
    finally:
        server.stop()
    head, _, rest = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and b"transfer-encoding: chunked" in head
    head, _, body = rest.partition(b"\r\n\r\n")   # the GET's answer right after the head
    assert head.startswith(b"HTTP/1.1 200 ") and b"transfer-encoding: chunked" in head
    assert body == b"4\r\none \r\n3\r\ntwo\r\n0\r\n\r\n"


@pytest.mark.parametrize("request_bytes", [
    b"NOT HTTP AT ALL\r\n\r\n",
    b"POST /v1/chat/completions HTTP/1.1\r\ncontent-length: 2\r\ncontent-length: 3\r\n\r\n{}",
])
def test_a_request_that_is_not_plain_http_gets_an_openai_shaped_400_and_closes(
        front, request_bytes):
    before = _refused(front, "bad_request")
    with _connect(front) as sock:
        sock.sendall(request_bytes)
        ((status, headers, body),) = _answers(_read_all(sock))
    assert status == 400 and headers["connection"] == "close"
    assert set(json.loads(body)["error"]) == {"message", "type", "param", "code"}
    assert _refused(front, "bad_request") == before + 1


def test_an_upgrade_is_not_offered_the_request_is_answered_as_http_1_1(front):
    with _connect(front) as sock:   # as `curl --http2` asks on http://
        sock.sendall(b"GET /healthz HTTP/1.1\r\nhost: r\r\nconnection: Upgrade, HTTP2-Settings"
                     b"\r\nupgrade: h2c\r\nhttp2-settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n\r\n")
        ((status, headers, body),) = _answers(_read_all(sock))
    assert status == 200 and json.loads(body) == {"status": "ok"}
    assert headers["connection"] == "close"


def test_a_body_over_the_limit_is_refused_unread_by_its_length_or_as_it_passes_it(front):
    before = _refused(front, "too_large")
    with _connect(front) as sock:   # announced: refused before a byte of it is sent
        sock.sendall(_post(b"").replace(b"content-length: 0", b"content-length: 999999999"))
        ((status, _headers, body),) = _answers(_read_all(sock))
    assert status == 413 and json.loads(body)["error"]["code"] == "request_too_large"
    with _connect(front) as sock:   # chunked: refused once the chunks pass the limit
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: r\r\n"
                     b"transfer-encoding: chunked\r\n\r\n")
        for _ in range(3):
            sock.sendall(b"800\r\n" + b"x" * 0x800 + b"\r\n")
        ((status, _h, _b),) = _answers(_read_all(sock))
    assert status == 413
    assert _refused(front, "too_large") == before + 2


def test_a_head_over_the_limit_is_a_431_and_the_parser_keeps_none_of_it(front):
    before = _refused(front, "too_large")
    with _connect(front) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nhost: r\r\nx-big: ")
        try:
            for _ in range(64):   # 1 MiB of one header's value, never ended
                sock.sendall(b"v" * 16384)
        except OSError:   # refused and closed before all of it went out
            pass
        ((status, headers, body),) = _answers(_read_all(sock))
    assert status == 431 and headers["connection"] == "close"
    assert json.loads(body)["error"]["code"] == "request_header_fields_too_large"
    assert _refused(front, "too_large") == before + 1
    with _connect(front) as sock:   # pipelined requests after a large body are not heads
        big = json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "x" * 3000}]})
        sock.sendall(_post(big.encode()) * 3 + b"GET /healthz HTTP/1.1\r\nhost: r\r\n"
                     b"connection: close\r\n\r\n")
        assert [a[0] for a in _answers(_read_all(sock))] == [200, 200, 200, 200]


def test_a_body_that_does_not_arrive_in_time_is_a_408(front):
    before = _refused(front, "body_timeout")
    with _connect(front) as sock:
        sock.sendall(_post(CHAT)[:-5])   # the last bytes never come
        started = time.monotonic()
        ((status, _headers, body),) = _answers(_read_all(sock))
    assert status == 408 and json.loads(body)["error"]["code"] == "request_timeout"
    assert time.monotonic() - started < 5
    assert _refused(front, "body_timeout") == before + 1


def test_a_head_that_does_not_arrive_in_time_closes_the_connection(front):
    with _connect(front) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: r\r\n")   # slowloris
        started = time.monotonic()
        assert _read_all(sock) == b""
    assert time.monotonic() - started < 5
    with _connect(front) as sock:   # an idle keep-alive connection goes the same way
        sock.sendall(_post(CHAT))
        time.sleep(0.2)
        assert int(sock.recv(65536).split()[1]) == 200
        started = time.monotonic()
        assert _read_all(sock) == b""
    assert time.monotonic() - started < 5


def test_a_client_that_leaves_before_its_answer_costs_nothing_but_that_answer(
        front, upstreams, caplog):
    """Its answer goes nowhere (uvloop raises on a closed transport: nothing may try), nothing
    is logged as an error, and the next clients are served."""
    upstreams["eu"].mode = upstreams["eu2"].mode = "slow"
    for _ in range(5):
        with _connect(front) as sock:
            sock.sendall(_post(CHAT))   # and gone before the slow answer
    time.sleep(1.0)
    upstreams["eu"].mode = upstreams["eu2"].mode = "ok"
    assert not [r for r in caplog.records if r.levelname == "ERROR"], caplog.text
    with _connect(front) as sock:
        sock.sendall(_post(CHAT, b"connection: close\r\n"))
        assert [a[0] for a in _answers(_read_all(sock))] == [200]


def test_a_stream_goes_out_chunked_and_a_client_that_leaves_cancels_it(front, upstreams):
    body = json.dumps({"model": "tiny", "stream": True, "max_tokens": 200, "delay": 0.05,
                       "user": "front-leaver", "messages": [{"role": "user", "content": "x"}]})
    with _connect(front) as sock:
        sock.sendall(_post(body.encode()))
        first = sock.recv(65536)
        assert b"transfer-encoding: chunked" in first.lower()
    deadline = time.monotonic() + 20
    served = [u for u in upstreams.values() if "front-leaver" in u.streams]
    while served[0].streams["front-leaver"] != "cancelled" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert served[0].streams["front-leaver"] == "cancelled"
