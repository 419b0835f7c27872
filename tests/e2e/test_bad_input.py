"""Bad input, sent to a real agent and to a real router in front of it: every case is a 4xx in
OpenAI's shape, both stay alive and answer health checks at once, a stream running on the agent
meanwhile completes untouched, the router keeps the agent in its table (a client's mistake is
not the edge's failure), and the agent's memory stays bounded."""

from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import pytest

from tests.e2e.agent_support import agent_behind_router

MSG = [{"role": "user", "content": "hi"}]


def _chat(**extra) -> bytes:
    return json.dumps({"messages": MSG, "max_tokens": 2, **extra}).encode()


# (name, body bytes, extra headers, expected status, expected error code or param)
CASES = [
    ("nested 100,000 deep", b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", {},
     400, "invalid_json"),
    ("lone surrogate", b'{"model": "M", "messages": [{"role": "user", "content": "a\\ud800b"}]}',
     {}, 400, "invalid_utf8"),
    ("invalid UTF-8", b'{"model": "M", "messages": [{"role": "user", "content": "\xff\xfe"}]}',
     {}, 400, "invalid_utf8"),
    ("NaN", b'{"model": "M", "messages": [], "temperature": NaN}', {}, 400, "invalid_json"),
    ("infinity", _chat(model="M", temperature=1e999).replace(b"Infinity", b"1e999"), {}, 400,
     "temperature"),
    ("seed past 64 bits", _chat(model="M", seed=2**64), {}, 400, "seed"),
    ("max_tokens past 32 bits", _chat(model="M", max_tokens=2**40), {}, 400, "max_tokens"),
    ("not an object", b"[1, 2, 3]", {}, 400, None),
    ("20 MB prompt", _chat(model="M", messages=[{"role": "user", "content": "x" * 20_000_000}]),
     {}, 413, "request_too_large"),
]


def _rss_mb(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@pytest.fixture(scope="module")
def stack(tmp_path_factory, tiny_genai_bundle):
    with agent_behind_router(tmp_path_factory.mktemp("bad-input"), tiny_genai_bundle,
                             "victim") as s:
        yield s.agent, s.agent_url, s.router_url, tiny_genai_bundle.name


def _announce_a_huge_body(url: str) -> tuple[int, float]:
    """Headers that announce a terabyte, and no body: the answer comes at once, unread."""
    host, port = url.removeprefix("http://").split(":")
    started = time.monotonic()
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n"
                     b"content-type: application/json\r\ncontent-length: 1000000000000\r\n\r\n")
        head = sock.recv(4096).decode()
    return int(head.split()[1]), time.monotonic() - started


def _send(url: str, body: bytes, headers: dict, model: str) -> httpx.Response:
    body = body.replace(b'"model": "M"', f'"model": "{model}"'.encode())
    return httpx.post(url + "/v1/chat/completions", content=body, timeout=60,
                      headers={"content-type": "application/json", **headers})


def test_every_bad_input_is_a_4xx_and_nothing_else_suffers(stack):
    agent, agent_url, router_url, model = stack
    streams: list[dict] = []
    done = threading.Event()

    def one_stream() -> dict:
        result = {"events": 0}
        with httpx.stream("POST", agent_url + "/v1/completions", timeout=300, json={
                "model": model, "prompt": "Once", "max_tokens": 300, "ignore_eos": True,
                "stream": True, "temperature": 0,
                "stream_options": {"include_usage": True}}) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    chunk = json.loads(line[6:])
                    result["events"] += 1
                    if "error" in chunk:
                        result["error"] = chunk
                    elif chunk["choices"] and chunk["choices"][0]["finish_reason"]:
                        result["finish"] = chunk["choices"][0]["finish_reason"]
                    elif chunk.get("usage"):
                        result["tokens"] = chunk["usage"]["completion_tokens"]
        return result

    def long_stream():  # streams, one after another, for as long as the bad input goes on
        while not done.is_set():
            streams.append(one_stream())

    streaming = threading.Thread(target=long_stream)
    streaming.start()
    rss_before = _rss_mb(agent.pid)
    rss_peak = rss_before
    for target in (agent_url, router_url):
        for name, body, headers, status, what in CASES:
            r = _send(target, body, headers, model)
            assert r.status_code == status, (target, name, r.status_code, r.text[:300])
            err = r.json()["error"]
            assert set(err) == {"message", "type", "param", "code"}, (target, name)
            if what is not None:
                assert what in (err["code"], err["param"]), (target, name, err)
            started = time.monotonic()
            assert httpx.get(target + "/healthz", timeout=5).status_code == 200, (target, name)
            assert time.monotonic() - started < 1.0, (target, name, "health check was slow")
            rss_peak = max(rss_peak, _rss_mb(agent.pid))
        status, took = _announce_a_huge_body(target)
        assert status == 413 and took < 2.0, (target, status, took)
    # seed -1 is "no seed" (random), as in llama.cpp: answered, on the agent and through the router
    for target in (agent_url, router_url):
        r = _send(target, _chat(model="M", seed=-1, temperature=0.8), {}, model)
        assert r.status_code == 200, r.text
    done.set()
    streaming.join(300)
    assert len(streams) >= 2, streams
    for result in streams:
        assert "error" not in result and result.get("finish") == "length" and \
            result.get("tokens") == 300, result
    assert agent.alive()
    assert rss_peak - rss_before < 150, f"RSS grew from {rss_before:.0f} to {rss_peak:.0f} MB"
    rows = httpx.get(router_url + "/edgegen/v1/endpoints").json()["endpoints"]
    assert [(r["node"], r["state"], r["failures"]) for r in rows] == [("victim", "healthy", 0)]
    metrics = httpx.get(router_url + "/metrics").text
    assert 'edgegen_router_requests_total{outcome="too_large",tier="none"} 2.0' in metrics
