"""Operating a real agent: hot swap (good and tampered bundles), embeddings, bundle URLs with
an offline restart, and on SmolLM2 int4 (slow enough to observe): backpressure, a client
that disconnects, and a graceful SIGTERM drain."""

from __future__ import annotations

import json
import shutil
import time

import httpx
import numpy as np
import openai
import pytest

from tests.cloud_router.registry_support import start_registry
from tests.e2e.agent_support import start_agent
from tests.support.procs import EdgegenProcess, free_port, wait_http

ADMIN = "s3cret"


def _stream_lines(url: str, body: dict):
    """Open an SSE stream; returns (response context, line iterator)."""
    cm = httpx.stream("POST", url, json=body, timeout=120)
    r = cm.__enter__()
    return cm, r, r.iter_lines()


def _metric(url: str, name: str) -> float:
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


def _poll(cond, timeout=60.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_hot_swap_refuses_tampered_bundle_and_swaps_a_good_one(
        tiny_genai_bundle, tiny_optimum_bundle, tmp_path):
    tampered = tmp_path / "tampered"
    shutil.copytree(tiny_genai_bundle.path, tampered)
    cfg = tampered / "tokenizer_config.json"
    cfg.write_text(cfg.read_text().replace("}", ', "x": 1}', 1))
    a = start_agent(tiny_genai_bundle.path, tmp_path, "swap", "--admin-token", ADMIN)
    try:
        url = a.url + "/edgegen/v1/bundle"
        auth = {"authorization": f"Bearer {ADMIN}"}
        before = httpx.get(url).json()
        assert before["digest"] == tiny_genai_bundle.digest
        assert httpx.post(url, json={"path": str(tiny_optimum_bundle.path)}).status_code == 401
        r = httpx.post(url, json={"path": str(tampered)}, headers=auth, timeout=120)
        assert r.status_code == 400 and "tokenizer_config.json" in r.json()["error"]["message"]
        assert httpx.get(url).json()["digest"] == tiny_genai_bundle.digest
        # a stream in flight on the old bundle finishes across the swap
        cm, resp, lines = _stream_lines(a.url + "/v1/completions", {
            "prompt": "Hello", "max_tokens": 200, "stream": True, "ignore_eos": True})
        first = next(l for l in lines if l.startswith("data: {"))
        r = httpx.post(url, json={"path": str(tiny_optimum_bundle.path)}, headers=auth,
                       timeout=120)
        assert r.status_code == 200, r.text
        assert r.json()["digest"] == tiny_optimum_bundle.digest
        rest = [l for l in lines if l.startswith("data: ")]
        cm.__exit__(None, None, None)
        assert rest[-1] == "data: [DONE]"
        finish = [json.loads(l[6:])["choices"][0]["finish_reason"] for l in [first, *rest[:-1]]
                  if json.loads(l[6:])["choices"]]
        assert finish[-1] == "length"
        models = httpx.get(a.url + "/v1/models").json()["data"]
        assert [m["id"] for m in models] == [tiny_optimum_bundle.name]
        r = httpx.post(a.url + "/v1/completions", timeout=60, json={
            "model": tiny_optimum_bundle.name, "prompt": "Hello", "max_tokens": 4})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
        assert f'digest="{tiny_optimum_bundle.digest12}"' in httpx.get(a.url + "/metrics").text
    finally:
        assert a.stop() == 0


def test_embeddings_match_the_pytorch_reference(tiny_embedding_bundle, tiny_bert_dir, tmp_path):
    import torch
    from transformers import AutoModel, AutoTokenizer

    texts = ["the quick brown fox", "a longer sentence about the weather today"]
    tok = AutoTokenizer.from_pretrained(tiny_bert_dir)
    ref_model = AutoModel.from_pretrained(tiny_bert_dir).eval()
    enc = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = ref_model(**enc).last_hidden_state
    mask = enc["attention_mask"][..., None].float()
    ref = (hidden * mask).sum(1) / mask.sum(1)
    ref = torch.nn.functional.normalize(ref, dim=-1).numpy()

    a = start_agent(tiny_embedding_bundle.path, tmp_path, "embed")
    try:
        client = openai.OpenAI(base_url=a.url + "/v1", api_key="x")
        r = client.embeddings.create(model=tiny_embedding_bundle.name, input=texts)
        got = np.array([d.embedding for d in r.data])
        assert got.shape == ref.shape
        np.testing.assert_allclose(got, ref, atol=1e-4)
        assert r.usage.prompt_tokens == int(enc["attention_mask"].sum())
        bad = httpx.post(a.url + "/v1/embeddings", json={"input": []})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "input"
        assert httpx.post(a.url + "/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "x"}]}).status_code == 400
    finally:
        assert a.stop() == 0


def test_agent_fetches_a_bundle_url_and_restarts_offline(tiny_genai_bundle, tmp_path):
    port = free_port()
    store = tiny_genai_bundle.path.parent.parent
    server = EdgegenProcess(["bundle", "serve", str(store), "--port", str(port)], tmp_path,
                            "bundle-server")
    cache = tmp_path / "cache"
    url = (f"http://127.0.0.1:{port}/{tiny_genai_bundle.name}/"
           f"{tiny_genai_bundle.digest12}/")
    try:
        wait_http(f"http://127.0.0.1:{port}/index.json", proc=server.proc)
        a = start_agent(url, tmp_path, "fetching", "--store", str(cache))
        assert httpx.get(a.url + "/edgegen/v1/bundle").json()["digest"] == tiny_genai_bundle.digest
        assert a.stop() == 0
    finally:
        server.stop()
    assert (cache / tiny_genai_bundle.name / tiny_genai_bundle.digest12 / "edgegen.json").is_file()
    # the network is gone: the agent starts from the content-addressed cache
    a = start_agent(url, tmp_path, "offline", "--store", str(cache))
    try:
        r = httpx.post(a.url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 2},
                       timeout=60)
        assert r.status_code == 200
    finally:
        assert a.stop() == 0


@pytest.mark.smollm2
def test_backpressure_disconnect_and_graceful_drain(smollm2_int4_bundle, tmp_path):
    registry, consul = start_registry(tmp_path)
    a = start_agent(smollm2_int4_bundle.path, tmp_path, "busy", "--max-concurrency", "1",
                    "--queue-size", "0", "--drain-timeout", "60", "--consul", consul)

    def registered() -> bool:
        return bool(httpx.get(consul + "/v1/agent/services").json())

    try:
        _poll(registered, 30, "the agent to register")
        most = smollm2_int4_bundle.context_length - 64
        long_body = {"prompt": "Write a very long story.", "max_tokens": most, "stream": True,
                     "ignore_eos": True}
        cm, resp, lines = _stream_lines(a.url + "/v1/completions", long_body)
        assert resp.status_code == 200
        next(l for l in lines if l.startswith("data: {"))
        # the only slot is taken and nothing may wait: 429 with Retry-After, not ready
        r = httpx.post(a.url + "/v1/completions", json={"prompt": "x", "max_tokens": 2})
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
        assert r.json()["error"]["type"] == "rate_limited"
        assert httpx.get(a.url + "/readyz").status_code == 503
        # the client goes away mid-stream: its generation stops and the slot is freed
        cm.__exit__(None, None, None)
        _poll(lambda: _metric(a.url, "edgegen_inflight_requests") == 0, 30,
              "the disconnected stream to free its slot")
        generated = _metric(a.url, "edgegen_generated_tokens_total")
        assert generated < most // 4  # stopped soon after the client left, not at the end
        assert httpx.get(a.url + "/readyz").status_code == 200

        # SIGTERM mid-stream: not ready and deregistered at once (the router stops choosing
        # it now, not when its check next fails), the stream still completes, exit 0
        cm, resp, lines = _stream_lines(a.url + "/v1/completions", {
            "prompt": "Count to one hundred.", "max_tokens": 400, "stream": True,
            "ignore_eos": True})
        got = [next(l for l in lines if l.startswith("data: {"))]
        a.proc.proc.send_signal(15)
        _poll(lambda: httpx.get(a.url + "/readyz").status_code == 503, 10, "readyz to fail")
        _poll(lambda: not registered(), 10, "the agent to deregister when its drain begins")
        got += [l for l in lines if l.startswith("data: ")]
        cm.__exit__(None, None, None)
        assert got[-1] == "data: [DONE]"
        assert json.loads(got[-2][6:])["choices"][0]["finish_reason"] == "length"
        # the stream was still running when the agent left the registry
        assert len(got) > 50
        a.proc.proc.wait(60)
        assert a.proc.proc.returncode == 0
    finally:
        a.stop()
        registry.stop()
