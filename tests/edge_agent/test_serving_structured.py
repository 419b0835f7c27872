"""Tools, response formats, logprobs and ``n`` in the serving layer, on the fake engine.

The fake engine picks each scripted token through the real sampler (``sampling.pick``), so
the grammar masks it and logprobs are reported as on a real model; the real scheduler,
parser and response builders run. The same over HTTP and a real model: tests/e2e/."""

from __future__ import annotations

import json

import pytest

from edge_agent.serving.tool_calls import call_text
from tests.edge_agent.test_serving import (
    assert_error,
    chat_body,
    completion_body,
    run,
    serve,
)
from tests.support.fake_engine import FakeEngine, Reply, serving_stack, write_fake_bundle

pytestmark = pytest.mark.timeout(30)

ARGS = '{"city": "Paris", "days": 3}'
CALL = call_text("get_weather", ARGS)
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "The forecast for a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                    "days": {"type": "integer"}},
                   "required": ["city", "days"]}}}]
ANSWER = '{"city": "Paris", "sunny": true}'
SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}, "sunny": {"type": "boolean"}},
          "required": ["city", "sunny"]}
FORMAT = {"type": "json_schema", "json_schema": {"name": "forecast", "schema": SCHEMA}}


@pytest.fixture(scope="module")
def bundle(bpe_tokenizer_dir, tmp_path_factory):
    return write_fake_bundle(bpe_tokenizer_dir, tmp_path_factory.mktemp("structured-store"))


def engine_replying(tok, text: str, **kw) -> FakeEngine:
    # the tools' description makes long prompts of the 400-token test vocabulary
    return FakeEngine(tok, default=Reply(text), context_length=2048, **kw)


def streamed_calls(chunks: list[dict]) -> dict[int, dict]:
    calls: dict[int, dict] = {}
    for chunk in chunks:
        for choice in chunk.get("choices") or ():
            for piece in choice["delta"].get("tool_calls") or ():
                call = calls.setdefault(piece["index"], {"id": None, "name": "", "arguments": ""})
                call["id"] = call["id"] or piece.get("id")
                call["name"] += piece["function"].get("name") or ""
                call["arguments"] += piece["function"].get("arguments") or ""
    return calls


@pytest.mark.parametrize("choice", ["auto", "required",
                                    {"type": "function", "function": {"name": "get_weather"}}])
def test_a_tool_call_streamed_reassembles_to_the_whole_call(bundle, bpe_tokenizer, choice):
    body = chat_body("Weather in Paris?", tools=TOOLS, tool_choice=choice, max_tokens=120)
    whole, _ = serve(bundle, engine_replying(bpe_tokenizer, CALL), "create_chat_completion", body)
    [out] = whole["choices"]
    assert out["finish_reason"] == "tool_calls" and out["message"]["content"] is None
    [call] = out["message"]["tool_calls"]
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"] == {"name": "get_weather", "arguments": ARGS}

    chunks, _ = serve(bundle, engine_replying(bpe_tokenizer, CALL), "create_chat_completion",
                      {**body, "stream": True})
    [streamed] = streamed_calls(chunks).values()
    assert (streamed["name"], streamed["arguments"]) == ("get_weather", ARGS)
    firsts = [p for c in chunks for ch in c["choices"] for p in ch["delta"].get("tool_calls", [])
              if "id" in p]
    assert len(firsts) == 1 and firsts[0]["type"] == "function"
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    assert all("content" not in ch["delta"] or ch["delta"]["content"] == ""
               for c in chunks for ch in c["choices"])


def test_with_tools_offered_the_model_may_answer_in_text(bundle, bpe_tokenizer):
    engine = engine_replying(bpe_tokenizer, "It is sunny.")
    result, _ = serve(bundle, engine, "create_chat_completion",
                      chat_body("Weather?", tools=TOOLS, max_tokens=30))
    message = result["choices"][0]["message"]
    assert message == {"role": "assistant", "content": "It is sunny."}
    assert result["choices"][0]["finish_reason"] == "stop"
    # the tools were shown to the model in the default format
    prompt = bpe_tokenizer.decode(engine.prompts[0], skip_special_tokens=False)
    assert "<tools>" in prompt and '"name": "get_weather"' in prompt


def test_a_conversation_with_calls_and_results_reaches_the_model(bundle, bpe_tokenizer):
    engine = engine_replying(bpe_tokenizer, "Sunny, 22 C.")
    messages = [{"role": "user", "content": "Weather?"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "call_a", "type": "function",
                     "function": {"name": "get_weather", "arguments": ARGS}}]},
                {"role": "tool", "tool_call_id": "call_a", "content": "sunny, 22 C"}]
    result, _ = serve(bundle, engine, "create_chat_completion",
                      {"messages": messages, "tools": TOOLS, "max_tokens": 30})
    assert result["choices"][0]["message"]["content"] == "Sunny, 22 C."
    prompt = bpe_tokenizer.decode(engine.prompts[0], skip_special_tokens=False)
    assert CALL in prompt and "<tool_response>\nsunny, 22 C\n</tool_response>" in prompt
    bad = [*messages[:1], {"role": "tool", "tool_call_id": "call_zz", "content": "x"}]
    result, _ = serve(bundle, engine, "create_chat_completion", {"messages": bad})
    assert_error(result, 400, "messages.1.tool_call_id")


@pytest.mark.parametrize("stream", [False, True])
def test_a_response_format_answer_is_the_json_object(bundle, bpe_tokenizer, stream):
    result, _ = serve(bundle, engine_replying(bpe_tokenizer, ANSWER), "create_chat_completion",
                      chat_body("Weather?", response_format=FORMAT, max_tokens=60, stream=stream))
    text = ("".join(c["choices"][0]["delta"].get("content") or "" for c in result if c["choices"])
            if stream else result["choices"][0]["message"]["content"])
    assert json.loads(text) == {"city": "Paris", "sunny": True}


def test_the_grammar_overrules_a_model_that_wants_something_else(bundle, bpe_tokenizer):
    """The scripted model wants prose; the answer is still an object of the schema (or says
    it ran out of tokens)."""
    result, _ = serve(bundle, engine_replying(bpe_tokenizer, "No JSON for you, sorry."),
                      "create_chat_completion",
                      chat_body("Weather?", response_format={"type": "json_schema", "json_schema": {
                          "name": "yn", "schema": {"enum": ["yes", "no"]}}}, max_tokens=20))
    assert json.loads(result["choices"][0]["message"]["content"]) in ("yes", "no")


def test_a_schema_that_cannot_finish_in_max_tokens_ends_with_length(bundle, bpe_tokenizer):
    result, _ = serve(bundle, engine_replying(bpe_tokenizer, ANSWER), "create_chat_completion",
                      chat_body("Weather?", response_format=FORMAT, max_tokens=3))
    assert result["choices"][0]["finish_reason"] == "length"
    assert result["usage"]["completion_tokens"] == 3


@pytest.mark.parametrize("stream", [False, True])
def test_n_choices_each_have_an_index_and_usage_is_summed(bundle, bpe_tokenizer, stream):
    one, _ = serve(bundle, engine_replying(bpe_tokenizer, "Hello there."), "create_chat_completion",
                   chat_body(max_tokens=10))
    result, _ = serve(bundle, engine_replying(bpe_tokenizer, "Hello there."),
                      "create_chat_completion",
                      chat_body(max_tokens=10, n=3, stream=stream, seed=7,
                                stream_options={"include_usage": True}))
    usage = result[-1]["usage"] if stream else result["usage"]
    assert usage["prompt_tokens"] == one["usage"]["prompt_tokens"]
    assert usage["completion_tokens"] == 3 * one["usage"]["completion_tokens"]
    if stream:
        texts: dict[int, str] = {}
        finished = set()
        for chunk in result[:-1]:
            [choice] = chunk["choices"]
            texts[choice["index"]] = texts.get(choice["index"], "") + (
                choice["delta"].get("content") or "")
            if choice["finish_reason"]:
                finished.add(choice["index"])
        assert texts == {i: "Hello there." for i in range(3)} and finished == {0, 1, 2}
    else:
        assert [c["index"] for c in result["choices"]] == [0, 1, 2]
        assert {c["message"]["content"] for c in result["choices"]} == {"Hello there."}


def test_n_choices_are_admitted_together_or_not_at_all(bundle, bpe_tokenizer):
    result, _ = serve(bundle, engine_replying(bpe_tokenizer, "Hi."), "create_chat_completion",
                      chat_body(n=4), max_concurrency=2, queue_size=1)
    err = assert_error(result, 429, code="queue_full")
    assert err["type"] == "rate_limited"


@pytest.mark.parametrize("stream", [False, True])
def test_chat_logprobs_cover_every_token_of_the_content(bundle, bpe_tokenizer, stream):
    result, _ = serve(bundle, engine_replying(bpe_tokenizer, "Hello there."),
                      "create_chat_completion",
                      chat_body(max_tokens=10, logprobs=True, top_logprobs=2, stream=stream))
    if stream:
        entries = [e for c in result for ch in c["choices"] if ch["logprobs"]
                   for e in ch["logprobs"]["content"]]
        content = "".join(ch["delta"].get("content") or "" for c in result for ch in c["choices"])
    else:
        entries = result["choices"][0]["logprobs"]["content"]
        content = result["choices"][0]["message"]["content"]
    assert "".join(e["token"] for e in entries) == content == "Hello there."
    for e in entries:
        assert bytes(e["bytes"]).decode() == e["token"]
        assert e["logprob"] <= 0 and len(e["top_logprobs"]) == 2
        assert e["top_logprobs"][0]["token"] == e["token"]      # the scripted token leads
        assert set(e["top_logprobs"][0]) == {"token", "logprob", "bytes"}


def test_completion_logprobs_in_the_legacy_shape(bundle, bpe_tokenizer):
    result, _ = serve(bundle, engine_replying(bpe_tokenizer, " Paris is big."), "create_completion",
                      completion_body(max_tokens=10, logprobs=3))
    choice = result["choices"][0]
    lp = choice["logprobs"]
    assert "".join(lp["tokens"]) == choice["text"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"])
    assert lp["text_offset"] == [sum(len(t) for t in lp["tokens"][:i])
                                 for i in range(len(lp["tokens"]))]
    assert all(len(top) == 3 for top in lp["top_logprobs"])


def test_an_engine_that_samples_inside_its_runtime_refuses_what_needs_the_sampler(
        bundle, bpe_tokenizer):
    engine = engine_replying(bpe_tokenizer, "Hi.")
    engine.picks_tokens = False   # as onnxruntime-genai's loop on GPUs
    for params, param in ((dict(response_format=FORMAT), "response_format"),
                          (dict(tools=TOOLS), "tools"), (dict(logprobs=True), "logprobs")):
        result, _ = serve(bundle, engine, "create_chat_completion", chat_body(**params))
        assert_error(result, 400, param, "unsupported_parameter")
    assert engine.prompts == []


def test_closing_a_stream_of_n_choices_frees_every_slot(bundle, bpe_tokenizer):
    engine = FakeEngine(bpe_tokenizer, context_length=4096, default=Reply("la ", eos=False))

    async def go():
        async with serving_stack(bundle, engine, max_concurrency=3, queue_size=0) as stack:
            stream = await stack.serving.create_chat_completion(chat_body(
                stream=True, n=3, max_tokens=1000))
            got = [await anext(stream) for _ in range(8)]
            await stream.aclose()
            idle = await stack.host.wait_idle(5)
            return got, idle, stack.host.inflight()
    got, idle, inflight = run(go())
    assert {c["choices"][0]["index"] for c in got} == {0, 1, 2}
    assert idle and inflight == 0
    assert engine.released == 3 and sum(engine.batches) < 3000
