"""The prefix cache and chunked prefill through a real agent process: usage, metrics,
salts, bad input, token arrival while a long prompt is read, and one copy of the weights."""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.e2e.agent_support import start_agent

SYSTEM = ("You are the assistant of a chain of hardware stores. Answer briefly and politely. "
          "Opening hours are nine to seven on weekdays and ten to six on Saturdays. ") * 4


def chat(url: str, question: str, *, max_tokens: int = 12, **extra) -> dict:
    body = {"messages": [{"role": "system", "content": SYSTEM},
                         {"role": "user", "content": question}],
            "max_tokens": max_tokens, "temperature": 0, **extra}
    r = httpx.post(url + "/v1/chat/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def cached(body: dict) -> int:
    return body["usage"]["prompt_tokens_details"]["cached_tokens"]


def metric(url: str, name: str) -> float:
    text = httpx.get(url + "/metrics", timeout=10).text
    m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    assert m, f"{name} not in /metrics"
    return float(m.group(1))


@pytest.fixture(scope="module")
def agents(tiny_genai_bundle, tmp_path_factory):
    """The same bundle with and without a prefix cache."""
    logs = tmp_path_factory.mktemp("prefix-logs")
    on = start_agent(tiny_genai_bundle.path, logs, "cache-on", "--stream-interval-ms", "0")
    off = start_agent(tiny_genai_bundle.path, logs, "cache-off", "--prefix-cache-mb", "0")
    yield on.url, off.url, on
    assert on.stop() == 0 and off.stop() == 0


def test_a_shared_system_prompt_is_found_and_changes_no_token(agents):
    on, off, _ = agents
    first = chat(on, "When do you open on Saturday?")
    second = chat(on, "Do you sell paint?")
    assert cached(first) == 0
    n = cached(second)
    assert n >= 64 and n % 16 == 0 and n < second["usage"]["prompt_tokens"]
    for body, question in ((first, "When do you open on Saturday?"),
                           (second, "Do you sell paint?")):
        plain = chat(off, question)
        assert cached(plain) == 0
        assert body["choices"][0]["message"] == plain["choices"][0]["message"]


def test_streamed_usage_reports_cached_tokens(agents):
    on, _, _ = agents
    chat(on, "Is there parking?")
    with httpx.stream("POST", on + "/v1/chat/completions", timeout=120, json={
            "messages": [{"role": "system", "content": SYSTEM},
                         {"role": "user", "content": "Is there parking?"}],
            "max_tokens": 4, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}) as r:
        lines = [line for line in r.iter_lines() if line.startswith("data: {")]
    usage = httpx.Response(200, content=lines[-1][6:]).json()["usage"]
    assert usage["prompt_tokens_details"]["cached_tokens"] >= 64


def test_salts_keep_tenants_apart(agents):
    on, _, _ = agents
    assert cached(chat(on, "Where is the Lyon store?", cache_salt="tenant-a")) == 0
    assert cached(chat(on, "Where is the Lyon store?", cache_salt="tenant-b")) == 0
    assert cached(chat(on, "Where is the Lyon store?", cache_salt="tenant-a")) >= 64


@pytest.mark.parametrize("salt", [123, "", ["a"], {"a": 1}, True, "x" * 1025])
def test_a_bad_salt_is_a_400(agents, salt):
    on, _, _ = agents
    r = httpx.post(on + "/v1/chat/completions", timeout=30, json={
        "messages": [{"role": "user", "content": "hi"}], "cache_salt": salt})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "cache_salt"


def test_metrics_count_queries_and_hits_in_tokens(agents):
    on, _, _ = agents
    queries = metric(on, "edgegen_prefix_cache_queries_total")
    hits = metric(on, "edgegen_prefix_cache_hits_total")
    body = chat(on, "Can I return a drill?")
    assert metric(on, "edgegen_prefix_cache_queries_total") == queries + body["usage"]["prompt_tokens"]
    assert metric(on, "edgegen_prefix_cache_hits_total") == hits + cached(body)


def test_a_prompt_larger_than_the_cache_is_answered(tiny_genai_bundle, tmp_path):
    # a 1 MiB budget holds a few hundred tokens of this model: the prompt's head is kept
    agent = start_agent(tiny_genai_bundle.path, tmp_path, "tiny-cache", "--prefix-cache-mb", "1")
    try:
        long = "word " * 700
        first = chat(agent.url, long)
        again = chat(agent.url, long)
        assert 0 < cached(again) < again["usage"]["prompt_tokens"]
        assert first["choices"][0]["message"] == again["choices"][0]["message"]
    finally:
        assert agent.stop() == 0


@pytest.fixture(scope="module")
def smollm2_agents(smollm2_int4_bundle, tmp_path_factory):
    """The real SmolLM2 int4 bundle (MatMulNBits, GroupQueryAttention) with and without."""
    logs = tmp_path_factory.mktemp("prefix-smollm2-logs")
    on = start_agent(smollm2_int4_bundle.path, logs, "smollm2-on", "--stream-interval-ms", "0")
    off = start_agent(smollm2_int4_bundle.path, logs, "smollm2-off", "--prefix-cache-mb", "0")
    yield on.url, off.url
    assert on.stop() == 0 and off.stop() == 0


def test_smollm2_hits_give_the_tokens_of_no_cache(smollm2_agents):
    """On int4 weights a 1-token run computes the keys and values of a position slightly
    differently from a longer run; hits must still give exactly the uncached tokens."""
    on, off = smollm2_agents
    for question in ("When do you open on Saturday?", "Do you sell paint?",
                     "Where can I park?"):
        hit, plain = chat(on, question, max_tokens=32), chat(off, question, max_tokens=32)
        assert hit["choices"][0]["message"] == plain["choices"][0]["message"], question
    assert cached(hit) >= 64


def test_running_streams_get_tokens_while_a_long_prompt_is_read(smollm2_agents):
    """Asserted on arrival order: between the long request's send and its first token, the
    running stream receives many tokens; read in one go, the ~1000-token prompt would hold
    the stream for the whole prefill (a token or two in that window)."""
    on, _ = smollm2_agents
    stamps: list[float] = []
    started = threading.Event()

    def stream():
        with httpx.stream("POST", on + "/v1/completions", timeout=300, json={
                "prompt": "Once upon a time", "max_tokens": 2000, "temperature": 0,
                "ignore_eos": True, "stream": True}) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    stamps.append(time.monotonic())
                    if len(stamps) == 5:
                        started.set()
                    if stop.is_set():
                        return

    stop = threading.Event()
    t = threading.Thread(target=stream)
    t.start()
    try:
        assert started.wait(120)
        sent = time.monotonic()
        with httpx.stream("POST", on + "/v1/completions", timeout=300, json={
                "prompt": "apple pie, " * 250, "max_tokens": 1, "temperature": 0,
                "stream": True}) as r:
            assert r.status_code == 200, r.read()
            first = next(time.monotonic() for line in r.iter_lines()
                         if line.startswith("data: {"))
    finally:
        stop.set()
        t.join(300)
    during = [s for s in stamps if sent < s < first]
    assert len(during) >= 30, (len(during), first - sent)


def test_one_onnxruntime_session_holds_the_weights(agents, tiny_genai_bundle):
    """On the process: onnxruntime-genai (a second session, a second copy of the weights)
    is not even loaded on CPU, and onnxruntime's own library is."""
    _, _, agent = agents
    maps = Path(f"/proc/{agent.proc.pid}/maps").read_text()
    assert "onnxruntime_pybind11_state" in maps
    assert "onnxruntime_genai" not in maps and "onnxruntime-genai" not in maps


ADMIN = "prefix-admin-token"


def test_reset_and_hot_swap_never_serve_old_entries(tiny_genai_bundle, tmp_path):
    """A reset forgets every entry (admin only) without disturbing a stream that is reading
    from the cache, and a hot swap starts the new model with an empty cache, even when the
    new bundle is the same model: entries belong to the engine that computed them."""
    agent = start_agent(tiny_genai_bundle.path, tmp_path, "resets", "--admin-token", ADMIN)
    url, auth = agent.url, {"authorization": f"Bearer {ADMIN}"}
    try:
        reset = url + "/edgegen/v1/prefix-cache/reset"
        want = chat(url, "Do you cut keys?", max_tokens=60)
        assert cached(chat(url, "Do you cut keys?")) > 0
        assert httpx.post(reset, timeout=30).status_code == 401
        assert httpx.post(reset, headers={"authorization": "Bearer wrong"},
                          timeout=30).status_code == 401
        # reset while a request that hit the cache is streaming: it finishes unchanged
        with httpx.stream("POST", url + "/v1/chat/completions", timeout=120, json={
                "messages": [{"role": "system", "content": SYSTEM},
                             {"role": "user", "content": "Do you cut keys?"}],
                "max_tokens": 60, "temperature": 0, "stream": True,
                "stream_options": {"include_usage": True}}) as r:
            lines = r.iter_lines()
            first = next(line for line in lines if line.startswith("data: {"))
            assert httpx.post(reset, headers=auth, timeout=30).json() == {"reset": True}
            rest = [line for line in lines if line.startswith("data: {")]
        chunks = [httpx.Response(200, content=line[6:]).json() for line in [first, *rest]]
        text = "".join(c["choices"][0]["delta"].get("content") or ""
                       for c in chunks if c["choices"])
        assert text == want["choices"][0]["message"]["content"]
        assert chunks[-1]["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
        assert cached(chat(url, "Do you cut keys?")) == 0    # forgotten
        assert cached(chat(url, "Do you cut keys?")) > 0     # and filled again
        r = httpx.post(url + "/edgegen/v1/bundle", json={"path": str(tiny_genai_bundle.path)},
                       headers=auth, timeout=120)
        assert r.status_code == 200, r.text
        after = chat(url, "Do you cut keys?", max_tokens=60)
        assert cached(after) == 0 and after["choices"] == want["choices"]
    finally:
        assert agent.stop() == 0


def test_a_reset_without_an_admin_token_is_refused(agents):
    on, _, _ = agents
    r = httpx.post(on + "/edgegen/v1/prefix-cache/reset", timeout=30)
    assert r.status_code == 403 and r.json()["error"]["type"] == "permission_error"
