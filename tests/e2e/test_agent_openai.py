"""A real agent process on the tiny random genai bundle, driven with the official openai client
and raw HTTP: chat and completions, streaming and not, bad input, headers, metrics, models."""

from __future__ import annotations

import json
import shutil
import subprocess

import httpx
import openai
import pytest

from edge_agent import hugepages
from tests.e2e.agent_support import start_agent


@pytest.fixture(scope="module")
def agent(tiny_genai_bundle, tmp_path_factory):
    a = start_agent(tiny_genai_bundle.path, tmp_path_factory.mktemp("agent-logs"), "edge-a",
                    "--tier", "edge", "--max-concurrency", "2", "--queue-size", "4")
    yield a
    assert a.stop() == 0


@pytest.fixture(scope="module")
def client(agent):
    return openai.OpenAI(base_url=agent.url + "/v1", api_key="unused", timeout=120)


@pytest.fixture(scope="module")
def model(tiny_genai_bundle):
    return tiny_genai_bundle.name


def test_models_lists_the_bundle(client, model):
    assert [m.id for m in client.models.list().data] == [model]


def test_a_model_is_retrieved_as_its_models_entry(agent, client, model):
    listed = httpx.get(agent.url + "/v1/models").json()["data"][0]
    assert httpx.get(agent.url + "/v1/models/" + model).json() == listed
    card = client.models.retrieve(model)
    assert (card.id, card.object, card.created) == (model, "model", listed["created"])
    # an id with a slash reaches the route (as sent, and as the client encodes it): a model
    # not found, not an unknown route
    for path in ("org/" + model, "org%2F" + model):
        r = httpx.get(agent.url + "/v1/models/" + path)
        assert r.status_code == 404 and set(r.json()) == {"error"}, path
        err = r.json()["error"]
        assert (err["type"], err["param"], err["code"]) == ("not_found_error", "model",
                                                           "model_not_found")
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("org/" + model)


def test_chat_non_streaming(client, model):
    r = client.chat.completions.create(model=model, max_tokens=12, temperature=0,
                                       messages=[{"role": "user", "content": "Hello there"}])
    choice = r.choices[0]
    assert r.object == "chat.completion" and choice.message.role == "assistant"
    assert choice.finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens > 5
    assert 1 <= r.usage.completion_tokens <= 12
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    if choice.finish_reason == "length":
        assert r.usage.completion_tokens == 12


def test_chat_streaming_matches_non_streaming(client, model):
    kwargs = dict(model=model, max_tokens=16, temperature=0,
                  messages=[{"role": "user", "content": "Tell me a story"}])
    full = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(stream=True,
                                                 stream_options={"include_usage": True},
                                                 **kwargs))
    assert len({c.id for c in chunks}) == 1
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    content_chunks = [c for c in chunks if c.choices]
    assert content_chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason
    text = "".join(c.choices[0].delta.content or "" for c in content_chunks)
    assert text == full.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == full.usage.total_tokens


def test_completions_streaming_and_not(client, model):
    full = client.completions.create(model=model, prompt="The weather today is", max_tokens=10,
                                     temperature=0)
    assert full.object == "text_completion" and full.usage.completion_tokens >= 1
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=model, prompt="The weather today is", max_tokens=10, temperature=0, stream=True)
        if c.choices)
    assert streamed == full.choices[0].text


def test_same_seed_same_output_and_sampling_differs(client, model):
    def run(seed):
        return client.completions.create(model=model, prompt="Once upon a time", max_tokens=16,
                                         temperature=1.0, top_p=0.95, seed=seed,
                                         extra_body={"ignore_eos": True}).choices[0].text
    a, b = run(7), run(7)
    assert a == b
    assert any(run(s) != a for s in (8, 9, 10))


def test_stop_string_is_never_emitted(client, model):
    base = client.completions.create(model=model, prompt="Hello", max_tokens=20, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    assert len(base) > 6
    stop = base[3:6]
    cut = base.index(stop)
    r = client.completions.create(model=model, prompt="Hello", max_tokens=20, temperature=0,
                                  stop=[stop], extra_body={"ignore_eos": True})
    assert r.choices[0].text == base[:cut] and r.choices[0].finish_reason == "stop"

    def upto(n):
        return client.completions.create(model=model, prompt="Hello", max_tokens=n, temperature=0,
                                         extra_body={"ignore_eos": True}).choices[0].text
    # usage counts the tokens up to the one that completed the stop string, not the ones the
    # scheduler may have decoded before the stream saw it
    n = r.usage.completion_tokens
    assert stop in upto(n) and (n == 1 or stop not in upto(n - 1))
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=model, prompt="Hello", max_tokens=20, temperature=0, stop=[stop], stream=True,
        extra_body={"ignore_eos": True}) if c.choices)
    assert streamed == base[:cut]


def test_every_response_carries_node_headers(agent):
    for path in ("/healthz", "/readyz", "/v1/models", "/metrics", "/nope"):
        r = httpx.get(agent.url + path)
        assert r.headers["x-edgegen-node"] == "edge-a", path
        assert r.headers["x-edgegen-tier"] == "edge", path
    with httpx.stream("POST", agent.url + "/v1/completions", timeout=60,
                      json={"prompt": "Hi", "max_tokens": 2, "stream": True}) as r:
        assert r.headers["x-edgegen-node"] == "edge-a"
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [l for l in r.iter_lines() if l]
    assert lines[-1] == "data: [DONE]"


BAD = [
    (b"{not json", "invalid_json", None),
    (json.dumps([1, 2]).encode(), None, None),
    (json.dumps({"messages": []}).encode(), None, "messages"),
    (json.dumps({"messages": "hi"}).encode(), None, "messages"),
    (json.dumps({"messages": [{"role": "wizard", "content": "x"}]}).encode(), None, "messages.0.role"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}], "temperature": -1}).encode(), None, "temperature"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}], "top_p": 1.5}).encode(), None, "top_p"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}], "max_tokens": "ten"}).encode(), None, "max_tokens"),
    *[(json.dumps({"messages": [{"role": "user", "content": "x"}], **extra}).encode(), code, param)
      for extra, code, param in [
          ({"n": 17}, "invalid_value", "n"),
          ({"logit_bias": {"1": 3}}, "unsupported_parameter", "logit_bias"),
          ({"top_logprobs": 3}, "invalid_value", "top_logprobs"),
          ({"tools": [{"type": "retrieval", "function": {"name": "f"}}]}, "invalid_value",
           "tools.0.type"),
          ({"tools": [{"type": "function", "function": {"name": "f"}}],
            "tool_choice": {"type": "function", "function": {"name": "g"}}}, "invalid_value",
           "tool_choice"),
          ({"response_format": {"type": "json_schema", "json_schema": {
              "name": "s", "schema": {"type": "integer", "minimum": "zero"}}}},
           "invalid_schema", "response_format.json_schema.schema"),
          ({"response_format": {"type": "json_schema", "json_schema": {
              "name": "s", "schema": {"not": {"type": "string"}}}}},
           "unsupported_schema", "response_format.json_schema.schema"),
          ({"messages": [{"role": "tool", "tool_call_id": "call_1", "content": "x"}]}, None,
           "messages.0.tool_call_id"),
      ]],
]


@pytest.mark.parametrize("body,code,param", BAD)
def test_bad_input_is_a_400_in_openai_shape_and_the_next_request_works(agent, body, code, param):
    r = httpx.post(agent.url + "/v1/chat/completions", content=body,
                   headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["type"] == "invalid_request_error"
    if code:
        assert err["code"] == code
    if param:
        assert err["param"] == param
    ok = httpx.post(agent.url + "/v1/chat/completions", timeout=60, json={
        "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    assert ok.status_code == 200


def test_constrained_choices_decoded_as_a_batch_each_follow_the_schema(client, model):
    """A random model sampled at temperature 1: every choice of a batch of n, each with its
    own mask, is an object of the schema, with its logprobs."""
    schema = {"type": "object", "properties": {
        "level": {"enum": ["low", "high"]}, "ok": {"type": "boolean"},
        "code": {"type": "string", "pattern": "^E[0-9]{2}$"}},
        "required": ["level", "ok", "code"]}
    r = client.chat.completions.create(
        model=model, n=4, temperature=1.0, seed=3, max_tokens=60, logprobs=True,
        messages=[{"role": "user", "content": "Report"}],
        response_format={"type": "json_schema", "json_schema": {"name": "r", "schema": schema}})
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    for choice in r.choices:
        assert choice.finish_reason == "stop"
        value = json.loads(choice.message.content)
        assert set(value) == {"level", "ok", "code"} and value["level"] in ("low", "high")
        assert "".join(t.token for t in choice.logprobs.content) == choice.message.content


def test_a_random_model_calls_the_named_tool_with_valid_arguments(client, model):
    tool = {"type": "function", "function": {"name": "set_valve", "parameters": {
        "type": "object", "properties": {"open": {"type": "boolean"}}, "required": ["open"]}}}
    kwargs = dict(model=model, temperature=0, max_tokens=60, tools=[tool],
                  messages=[{"role": "user", "content": "Open it"}],
                  tool_choice={"type": "function", "function": {"name": "set_valve"}})
    [call] = client.chat.completions.create(**kwargs).choices[0].message.tool_calls
    assert call.function.name == "set_valve"
    assert isinstance(json.loads(call.function.arguments)["open"], bool)
    pieces = [p for chunk in client.chat.completions.create(stream=True, **kwargs)
              for c in chunk.choices for p in c.delta.tool_calls or ()]
    assert "".join(p.function.arguments or "" for p in pieces) == call.function.arguments


def test_harmless_unknown_fields_are_accepted(agent):
    r = httpx.post(agent.url + "/v1/chat/completions", timeout=60, json={
        "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
        "frequency_penalty": 0, "user": "u1", "metadata": {"a": "b"}, "store": False})
    assert r.status_code == 200


def test_prompt_longer_than_context_names_both_lengths(agent, tiny_genai_bundle):
    ctx = tiny_genai_bundle.context_length
    r = httpx.post(agent.url + "/v1/completions", timeout=60,
                   json={"prompt": "hello " * (ctx + 10), "max_tokens": 4})
    assert r.status_code == 400
    msg = r.json()["error"]["message"]
    assert str(ctx) in msg and "tokens" in msg
    r = httpx.post(agent.url + "/v1/completions", timeout=60,
                   json={"prompt": "hello", "max_tokens": ctx})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
    assert str(ctx) in r.json()["error"]["message"]


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-model", prompt="x", max_tokens=2)


def test_embeddings_on_a_generation_model_is_400(agent):
    r = httpx.post(agent.url + "/v1/embeddings", json={"input": "x"})
    assert r.status_code == 400


def test_metrics_pass_promtool_and_count_requests(agent, client, model):
    assert shutil.which("promtool"), "promtool comes with Debian's prometheus package"
    client.completions.create(model=model, prompt="Count me", max_tokens=3)
    text = httpx.get(agent.url + "/metrics").text
    r = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    for name in ("edgegen_requests_total", "edgegen_request_duration_seconds_bucket",
                 "edgegen_time_to_first_token_seconds_bucket",
                 "edgegen_time_per_output_token_seconds_bucket",
                 "edgegen_generated_tokens_total", "edgegen_prompt_tokens_total",
                 "edgegen_queue_depth", "edgegen_inflight_requests", "edgegen_bundle_info",
                 "edgegen_num_requests_waiting", "edgegen_num_requests_running",
                 "edgegen_kv_cache_usage_perc"):
        assert name in text, name
    assert 'edgegen_requests_total{endpoint="/v1/completions",status="200"}' in text
    assert f'name="{model}"' in text



def test_agent_runs_with_huge_page_malloc(agent, client, model, monkeypatch):
    """The agent re-executes itself once with glibc's hugetlb tunable (edge_agent/hugepages.py);
    where the kernel offers transparent huge pages, the weights then sit in them."""
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    monkeypatch.delenv("EDGEGEN_HUGEPAGES", raising=False)
    host_allows = hugepages.wanted()          # Linux, glibc >= 2.35, THP not "never"
    pid = agent.proc.proc.pid
    environ = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
    assert (b"GLIBC_TUNABLES=" + hugepages.TUNABLE.encode() in environ) == host_allows
    if host_allows:
        client.completions.create(model=model, prompt="Hi", max_tokens=2)
        rollup = open(f"/proc/{pid}/smaps_rollup").read()
        huge_kb = int(next(line.split()[1] for line in rollup.splitlines()
                           if line.startswith("AnonHugePages:")))
        assert huge_kb > 0


def load_report(header: str) -> dict[str, float]:
    """ORCA's TEXT format: ``TEXT named_metrics.<name>=<value>, ...``."""
    assert header.startswith("TEXT ")
    pairs = (item.strip().split("=") for item in header[len("TEXT "):].split(","))
    return {key.removeprefix("named_metrics."): float(value) for key, value in pairs}


def test_a_load_report_answers_who_asks_for_one(agent, model):
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    url = agent.url + "/v1/chat/completions"
    assert "endpoint-load-metrics" not in httpx.post(url, json=body, timeout=60).headers
    r = httpx.post(url, json=body, headers={"endpoint-load-metrics-format": "TEXT"}, timeout=60)
    report = load_report(r.headers["endpoint-load-metrics"])
    assert set(report) == {"num_requests_waiting", "num_requests_running",
                           "kv_cache_usage_perc"}
    assert report["num_requests_waiting"] >= 0 and report["num_requests_running"] >= 0
    assert 0 < report["kv_cache_usage_perc"] <= 1   # the conversations just read are cached
    with httpx.stream("POST", url, json={**body, "stream": True}, timeout=60,
                      headers={"endpoint-load-metrics-format": "text"}) as s:
        # a stream reports at its start, itself queued or running
        started = load_report(s.headers["endpoint-load-metrics"])
        assert started["num_requests_waiting"] + started["num_requests_running"] >= 1
    metrics = httpx.get(agent.url + "/metrics").text
    for name in ("edgegen_num_requests_waiting", "edgegen_num_requests_running",
                 "edgegen_kv_cache_usage_perc"):
        assert f"\n{name} " in metrics, name
