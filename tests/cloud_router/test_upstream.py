"""The router's upstream client (``cloud_router.upstream``) against raw socket servers that
misbehave on purpose: a pooled connection closed while idle, garbage, silence, a refusal,
a stream sent in pieces."""

from __future__ import annotations

import asyncio

import pytest

from cloud_router.upstream import ConnectFailed, UpstreamError, UpstreamPool
from tests.support.procs import free_port

OK = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}"


async def _serve(answer) -> tuple[asyncio.AbstractServer, int, list]:
    """A server on a free port running ``answer(reader, writer)`` per connection; the list
    collects one entry per connection."""
    connections: list = []

    async def handle(reader, writer):
        connections.append(writer)
        try:
            await answer(reader, writer)
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1], connections


async def _fails(answer, pool: UpstreamPool | None = None, match: str | None = None) -> None:
    """A request to a server running ``answer`` raises UpstreamError (matching ``match``)."""
    server, port, _ = await _serve(answer)
    try:
        with pytest.raises(UpstreamError, match=match):
            await (pool or UpstreamPool()).request("127.0.0.1", port, "/x", [], b"{}")
    finally:
        server.close()


async def _read_request(reader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length"))
    return head + await reader.readexactly(length)


def test_a_pooled_connection_closed_while_idle_is_replaced_without_an_error():
    async def main():
        async def once_then_close(reader, writer):   # answers one request, then hangs up
            await _read_request(reader)
            writer.write(OK)
            await writer.drain()

        server, port, conns = await _serve(once_then_close)
        pool = UpstreamPool()
        for _ in range(3):
            r = await pool.request("127.0.0.1", port, "/x", [], b"{}")
            assert (r.status, await r.read()) == (200, b"{}")
            r.release()
            await asyncio.sleep(0.05)   # the server's close arrives while the connection idles
        server.close()
        return len(conns)

    assert asyncio.run(main()) == 3


def test_a_pooled_connection_closed_as_the_request_goes_out_is_sent_once_more():
    """The agent's idle timeout races the request: the connection closes with no byte of an
    answer. The request goes again on a new connection; a new connection that does the same
    is an error (the endpoint, not the pool)."""
    async def main():
        async def answer_one_then_hang_up_on_the_next(reader, writer):
            await _read_request(reader)
            writer.write(OK)
            await writer.drain()
            await _read_request(reader)   # read, never answered

        server, port, conns = await _serve(answer_one_then_hang_up_on_the_next)
        pool = UpstreamPool()
        for _ in range(3):   # no pause: the connection is reused before the close comes
            r = await pool.request("127.0.0.1", port, "/x", [], b"{}")
            assert await r.read() == b"{}"
            r.release()
        server.close()
        return len(conns)

    assert asyncio.run(main()) == 3

    async def hang_up(reader, writer):
        await _read_request(reader)

    asyncio.run(_fails(hang_up, match="connection closed"))


def test_a_connection_reused_at_once_carries_every_request():
    async def main():
        async def keep_alive(reader, writer):
            while True:
                try:
                    await _read_request(reader)
                except asyncio.IncompleteReadError:
                    return
                writer.write(OK)

        server, port, conns = await _serve(keep_alive)
        pool = UpstreamPool()
        for _ in range(5):
            r = await pool.request("127.0.0.1", port, "/x", [("a", "b")], b"{}")
            assert await r.read() == b"{}"
            r.release()
        await pool.aclose()
        server.close()
        return len(conns)

    assert asyncio.run(main()) == 1


@pytest.mark.parametrize("reply", [b"SSH-2.0-OpenSSH_9.2\r\n", b"HTTP/1.1 200 OK\r\ncontent-len"])
def test_garbage_or_a_cut_head_is_an_upstream_error(reply):
    async def garbage(reader, writer):
        await _read_request(reader)
        writer.write(reply)
        await writer.drain()

    asyncio.run(_fails(garbage))


def test_silence_is_an_upstream_error_after_the_read_timeout():
    async def silent(reader, writer):
        await asyncio.sleep(5)

    async def main():
        loop = asyncio.get_running_loop()
        started = loop.time()
        await _fails(silent, UpstreamPool(read_timeout_s=0.3), match="no byte")
        return loop.time() - started

    assert asyncio.run(main()) < 2


def test_a_refused_connection_is_connect_failed():
    with pytest.raises(ConnectFailed, match="cannot connect"):
        asyncio.run(UpstreamPool().request("127.0.0.1", free_port(), "/x", [], b"{}"))


def test_a_chunked_stream_arrives_piece_by_piece_before_it_ends():
    async def main():
        go_on = asyncio.Event()

        async def stream(reader, writer):
            await _read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                         b"transfer-encoding: chunked\r\n\r\n6\r\ndata 1\r\n")
            await go_on.wait()
            writer.write(b"6\r\ndata 2\r\n0\r\n\r\n")

        server, port, _ = await _serve(stream)
        r = await UpstreamPool().request("127.0.0.1", port, "/x", [], b"{}")
        chunks = r.chunks()
        first = await chunks.__anext__()   # before the server sends the rest
        go_on.set()
        rest = [c async for c in chunks]
        r.release()
        server.close()
        return first, rest

    assert asyncio.run(main()) == (b"data 1", [b"data 2"])
