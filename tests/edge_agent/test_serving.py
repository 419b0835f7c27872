"""The OpenAI serving layer on a fake engine: every endpoint called directly, no HTTP, no model.

As vLLM tests its serving layer: ``OpenAIServing``, ``ModelHost``, the scheduler, the chat
template and the detokenizer are the real ones; only the engine is a fake
(``tests/support/fake_engine.py``) that generates a scripted reply with a real tokenizer. The
same behaviour over HTTP, MQTT and a real model is tested in ``tests/e2e/``.
"""

from __future__ import annotations

import asyncio
import base64
import threading

import numpy as np
import pytest

from edge_agent.errors import GenerationError
from edge_agent.serving.chat import CHAT
from edge_agent.serving.completion import COMPLETIONS
from edge_agent.serving.embedding import EMBEDDINGS
from edge_agent.serving.generation import ChunkStream
from edge_agent.serving.protocol import ErrorResult
from tests.support.fake_engine import (
    FakeEmbeddingEngine,
    FakeEngine,
    Reply,
    serving_stack,
    write_fake_bundle,
)

pytestmark = pytest.mark.timeout(30)

REPLY = "Paris is the capital of France. Goodbye now."
QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return tmp_path_factory.mktemp("serving-store")


@pytest.fixture(scope="module")
def bundle(bpe_tokenizer_dir, store):
    return write_fake_bundle(bpe_tokenizer_dir, store)


@pytest.fixture(scope="module")
def embedding_bundle(bpe_tokenizer_dir, store):
    return write_fake_bundle(bpe_tokenizer_dir, store, name="fake-embed",
                             task="feature-extraction", chat_template=None)


@pytest.fixture()
def engine(bpe_tokenizer):
    return FakeEngine(bpe_tokenizer, default=REPLY)


def run(coro, timeout: float = 10.0):
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def drain(result):
    """A stream's chunks as a list; anything else as it is."""
    if isinstance(result, ChunkStream):
        return [chunk async for chunk in result]
    return result


def serve(bundle, engine, method: str, body, **settings):
    """One request on a fresh serving stack: (result, stack); streams are read to the end."""
    async def go():
        async with serving_stack(bundle, engine, **settings) as stack:
            result = await drain(await getattr(stack.serving, method)(body))
        return result, stack
    return run(go())


def chat_body(text: str = QUESTION, **params) -> dict:
    return {"messages": [{"role": "user", "content": text}], **params}


def completion_body(text: str = QUESTION, **params) -> dict:
    return {"prompt": text, **params}


def chatml(text: str) -> str:
    """The prompt the ChatML template makes of one user message."""
    return f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"


# Each generating endpoint: the OpenAIServing method, the metrics label, a body builder, the
# prompt's text as the engine sees it, and the param a too-long prompt is blamed on.
ENDPOINTS = {
    "chat": ("create_chat_completion", CHAT, chat_body, chatml, "messages"),
    "completion": ("create_completion", COMPLETIONS, completion_body, lambda t: t, "prompt"),
}


@pytest.fixture(params=list(ENDPOINTS))
def endpoint(request):
    return ENDPOINTS[request.param]


def ids(tok, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False).ids


def first_prefix_containing(tok, token_ids: list[int], stop: str) -> int:
    """How many of ``token_ids`` it takes for their text to contain ``stop``."""
    return next(k for k in range(1, len(token_ids) + 1) if stop in tok.decode(token_ids[:k]))


def content(chunks: list[dict], chat: bool) -> str:
    if chat:
        return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks
                       if c.get("choices"))
    return "".join(c["choices"][0]["text"] for c in chunks if c.get("choices"))


def assert_error(result, status: int, param: str | None = None, code: str | None = None):
    assert isinstance(result, ErrorResult), result
    assert result.status == status, result.body
    err = result.body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    if param is not None:
        assert err["param"] == param
    if code is not None:
        assert err["code"] == code
    return err


# --- request errors ------------------------------------------------------------------------------

@pytest.mark.parametrize("params, param", [
    ({"temperature": "hot"}, "temperature"),
    ({"temperature": 2.5}, "temperature"),
    ({"temperature": -0.1}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"max_tokens": "many"}, "max_tokens"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"stream_options": "usage"}, "stream_options"),
    ({"seed": 1.5}, "seed"),
])
def test_bad_parameters_are_400s_naming_the_parameter(bundle, engine, endpoint, params, param):
    method, label, body, _, _ = endpoint
    result, stack = serve(bundle, engine, method, body(**params))
    err = assert_error(result, 400, param, "invalid_value")
    assert err["type"] == "invalid_request_error" and param in err["message"]
    assert engine.prompts == []                               # nothing reached the engine
    assert stack.requests(label, 400) == 1 and stack.requests(label, 200) == 0


@pytest.mark.parametrize("params, param", [
    ({"logit_bias": {"42": 10}}, "logit_bias"),
    ({"best_of": 3}, "best_of"),
    ({"suffix": "and so on"}, "suffix"),
])
def test_unsupported_parameters_are_400s_naming_the_parameter(bundle, engine, endpoint, params,
                                                              param):
    method, _, body, _, _ = endpoint
    result, _ = serve(bundle, engine, method, body(**params))
    err = assert_error(result, 400, param, "unsupported_parameter")
    assert param in err["message"]
    assert engine.prompts == []


def test_harmless_parameters_are_accepted(bundle, engine):
    result, _ = serve(bundle, engine, "create_chat_completion", chat_body(
        n=1, logprobs=False, tool_choice="none", response_format={"type": "text"},
        frequency_penalty=0, user="u1", metadata={"x": 1}))
    assert result["choices"][0]["message"]["content"] == REPLY


@pytest.mark.parametrize("body, param", [
    ({"messages": "hi"}, "messages"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "messages.0.role"),
    ({}, "messages"),
])
def test_bad_messages_are_400s(bundle, engine, body, param):
    result, _ = serve(bundle, engine, "create_chat_completion", body)
    assert_error(result, 400, param)


def test_content_parts_other_than_text_are_400s(bundle, engine):
    result, _ = serve(bundle, engine, "create_chat_completion", {"messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]})
    err = assert_error(result, 400, "messages")
    assert "image_url" in err["message"]


@pytest.mark.parametrize("body", [{"prompt": 5}, {"prompt": ""}, {"prompt": []},
                                  {"prompt": ["one", "two"]}, {"prompt": [1, "a"]}, {}])
def test_bad_prompts_are_400s(bundle, engine, body):
    result, _ = serve(bundle, engine, "create_completion", body)
    err = assert_error(result, 400, code="invalid_value")
    # a value none of the union's types take is named after the first of them ("prompt.str")
    assert err["param"].split(".")[0] == "prompt" and "prompt" in err["message"]


def test_a_stop_of_the_wrong_type_is_a_400(bundle, engine):
    result, _ = serve(bundle, engine, "create_chat_completion", chat_body(stop=5))
    err = assert_error(result, 400, code="invalid_value")
    assert err["param"].split(".")[0] == "stop"


@pytest.mark.parametrize("prompt", [[-1], [10**6]])
def test_prompt_token_ids_outside_the_vocabulary_are_400s(bundle, engine, prompt):
    result, _ = serve(bundle, engine, "create_completion", {"prompt": prompt})
    err = assert_error(result, 400, "prompt")
    assert str(engine.tokenizer.get_vocab_size()) in err["message"]


@pytest.mark.parametrize("method, label", [("create_chat_completion", CHAT),
                                           ("create_completion", COMPLETIONS),
                                           ("create_embedding", EMBEDDINGS)])
@pytest.mark.parametrize("body", [None, [], "hello", 3])
def test_a_body_that_is_not_an_object_is_a_400(bundle, engine, method, label, body):
    result, stack = serve(bundle, engine, method, body)
    err = assert_error(result, 400)
    assert err["type"] == "invalid_request_error" and "JSON object" in err["message"]
    assert stack.requests(label, 400) == 1


def test_an_unknown_model_is_a_404(bundle, engine, endpoint):
    method, label, body, _, _ = endpoint
    result, stack = serve(bundle, engine, method, body(model="gpt-4o"))
    err = assert_error(result, 404, "model", "model_not_found")
    assert err["type"] == "not_found_error"
    assert "gpt-4o" in err["message"] and bundle.name in err["message"]
    assert stack.requests(label, 404) == 1


def test_the_served_model_by_name_is_answered(bundle, engine, endpoint):
    method, _, body, _, _ = endpoint
    result, _ = serve(bundle, engine, method, body(model=bundle.name))
    assert result["model"] == bundle.name


def test_generation_on_an_embedding_model_and_embeddings_on_a_generator_are_400s(
        bundle, embedding_bundle, bpe_tokenizer, engine):
    result, _ = serve(embedding_bundle, FakeEmbeddingEngine(bpe_tokenizer),
                      "create_chat_completion", chat_body())
    assert_error(result, 400, "model")
    result, _ = serve(bundle, engine, "create_embedding", {"input": "hi"})
    assert_error(result, 400, "model")


def test_a_bundle_without_chat_template_refuses_chat_but_serves_completions(
        bpe_tokenizer_dir, bpe_tokenizer, store):
    plain = write_fake_bundle(bpe_tokenizer_dir, store, name="fake-plain", chat_template=None)
    engine = FakeEngine(bpe_tokenizer, default=REPLY)
    result, _ = serve(plain, engine, "create_chat_completion", chat_body())
    err = assert_error(result, 400, "messages")
    assert "/v1/completions" in err["message"]
    result, _ = serve(plain, engine, "create_completion", completion_body())
    assert result["choices"][0]["text"] == REPLY


# --- token limits ----------------------------------------------------------------------------

def test_a_prompt_too_long_for_the_context_is_a_400_naming_both_lengths(bundle, bpe_tokenizer,
                                                                        endpoint):
    method, label, body, as_prompt, param = endpoint
    engine = FakeEngine(bpe_tokenizer, context_length=32)
    text = "The quick brown fox jumps over the lazy dog. " * 4
    n_prompt = len(ids(bpe_tokenizer, as_prompt(text)))
    assert n_prompt > 32
    result, stack = serve(bundle, engine, method, body(text))
    err = assert_error(result, 400, param, "context_length_exceeded")
    assert f"{n_prompt} tokens" in err["message"] and "32" in err["message"]
    assert engine.prompts == [] and stack.requests(label, 400) == 1


def test_a_prompt_must_leave_room_for_one_token(bundle, bpe_tokenizer):
    engine = FakeEngine(bpe_tokenizer, context_length=16, default=Reply("la ", eos=False))
    result, _ = serve(bundle, engine, "create_completion", {"prompt": list(range(3, 19))})
    assert_error(result, 400, "prompt", "context_length_exceeded")
    result, _ = serve(bundle, engine, "create_completion", {"prompt": list(range(3, 18))})
    assert result["usage"] == {"prompt_tokens": 15, "completion_tokens": 1, "total_tokens": 16,
                               "prompt_tokens_details": {"cached_tokens": 0}}
    assert result["choices"][0]["finish_reason"] == "length"


@pytest.mark.parametrize("name", ["max_tokens", "max_completion_tokens"])
def test_an_explicit_max_tokens_past_the_context_is_a_400_naming_it(bundle, bpe_tokenizer, name):
    engine = FakeEngine(bpe_tokenizer, context_length=64)
    n_prompt = len(ids(bpe_tokenizer, chatml(QUESTION)))
    result, _ = serve(bundle, engine, "create_chat_completion",
                      chat_body(**{name: 64 - n_prompt + 1}))
    err = assert_error(result, 400, name, "context_length_exceeded")
    assert f"{64 - n_prompt + 1}" in err["message"] and f"{n_prompt} tokens" in err["message"]
    assert "64" in err["message"] and engine.prompts == []
    # exactly what the context leaves is allowed
    engine = FakeEngine(bpe_tokenizer, context_length=64, default=Reply("la ", eos=False))
    result, _ = serve(bundle, engine, "create_chat_completion", chat_body(**{name: 64 - n_prompt}))
    assert result["usage"]["completion_tokens"] == 64 - n_prompt


def test_completions_max_tokens_past_the_context_is_a_400(bundle, bpe_tokenizer):
    engine = FakeEngine(bpe_tokenizer, context_length=32)
    result, _ = serve(bundle, engine, "create_completion", completion_body(max_tokens=32))
    assert_error(result, 400, "max_tokens", "context_length_exceeded")


def test_without_max_tokens_generation_is_clamped_to_what_the_context_leaves(bundle,
                                                                            bpe_tokenizer,
                                                                            endpoint):
    method, _, body, as_prompt, _ = endpoint
    engine = FakeEngine(bpe_tokenizer, context_length=48, default=Reply("la ", eos=False))
    n_prompt = len(ids(bpe_tokenizer, as_prompt(QUESTION)))
    result, _ = serve(bundle, engine, method, body(), max_tokens_default=1000)
    assert result["usage"]["completion_tokens"] == 48 - n_prompt
    assert result["choices"][0]["finish_reason"] == "length"


def test_without_max_tokens_generation_stops_at_max_tokens_default(bundle, bpe_tokenizer,
                                                                   endpoint):
    method, _, body, _, _ = endpoint
    engine = FakeEngine(bpe_tokenizer, context_length=128, default=Reply("la ", eos=False))
    result, _ = serve(bundle, engine, method, body(), max_tokens_default=5)
    assert result["usage"]["completion_tokens"] == 5
    assert result["choices"][0]["finish_reason"] == "length"


# --- responses, usage, finish reasons, stop strings -----------------------------------------

def test_chat_response_shape_usage_and_eos(bundle, engine, bpe_tokenizer):
    result, stack = serve(bundle, engine, "create_chat_completion", chat_body())
    n_prompt = len(ids(bpe_tokenizer, chatml(QUESTION)))
    n_reply = len(ids(bpe_tokenizer, REPLY))
    assert engine.prompts == [ids(bpe_tokenizer, chatml(QUESTION))]   # the template was applied
    assert result["object"] == "chat.completion" and result["id"].startswith("chatcmpl-")
    assert result["model"] == bundle.name and isinstance(result["created"], int)
    [choice] = result["choices"]
    assert choice["index"] == 0 and choice["finish_reason"] == "stop"
    assert choice["message"] == {"role": "assistant", "content": REPLY}
    # EOS is a generated token and counts, as in vLLM and OpenAI
    assert result["usage"] == {"prompt_tokens": n_prompt, "completion_tokens": n_reply + 1,
                               "total_tokens": n_prompt + n_reply + 1,
                               "prompt_tokens_details": {"cached_tokens": 0}}
    assert stack.requests(CHAT, 200) == 1
    assert stack.sample("edgegen_prompt_tokens_total") == n_prompt
    assert stack.sample("edgegen_generated_tokens_total") == n_reply + 1
    assert stack.sample("edgegen_request_duration_seconds_count", {"endpoint": CHAT}) == 1


def test_completion_response_shape_and_usage(bundle, engine, bpe_tokenizer):
    result, stack = serve(bundle, engine, "create_completion", completion_body())
    n_prompt = len(ids(bpe_tokenizer, QUESTION))
    n_reply = len(ids(bpe_tokenizer, REPLY))
    assert engine.prompts == [ids(bpe_tokenizer, QUESTION)]
    assert result["object"] == "text_completion" and result["id"].startswith("cmpl-")
    [choice] = result["choices"]
    assert choice["text"] == REPLY and choice["finish_reason"] == "stop"
    assert result["usage"] == {"prompt_tokens": n_prompt, "completion_tokens": n_reply + 1,
                               "total_tokens": n_prompt + n_reply + 1,
                               "prompt_tokens_details": {"cached_tokens": 0}}
    assert stack.requests(COMPLETIONS, 200) == 1


def test_completion_prompt_as_token_ids(bundle, engine, bpe_tokenizer):
    prompt = ids(bpe_tokenizer, QUESTION)
    result, _ = serve(bundle, engine, "create_completion", {"prompt": prompt})
    assert engine.prompts == [prompt] and result["usage"]["prompt_tokens"] == len(prompt)


def test_max_tokens_gives_length(bundle, engine, bpe_tokenizer, endpoint):
    method, _, body, _, _ = endpoint
    result, _ = serve(bundle, engine, method, body(max_tokens=4))
    text = bpe_tokenizer.decode(ids(bpe_tokenizer, REPLY)[:4])
    choice = result["choices"][0]
    assert choice["finish_reason"] == "length"
    assert (choice["message"]["content"] if "message" in choice else choice["text"]) == text
    assert result["usage"]["completion_tokens"] == 4


def test_each_prompt_gets_its_scripted_reply(bundle, bpe_tokenizer):
    engine = FakeEngine(bpe_tokenizer, replies={"France": "Paris.", "Japan": "Tokyo."},
                        default="I do not know.")

    async def go():
        async with serving_stack(bundle, engine) as stack:
            return await asyncio.gather(*(
                stack.serving.create_chat_completion(chat_body(f"The capital of {c}?"))
                for c in ("France", "Japan", "Spain")))
    answers = [r["choices"][0]["message"]["content"] for r in run(go())]
    assert answers == ["Paris.", "Tokyo.", "I do not know."]
    assert max(engine.batches) > 1                  # decoded together


@pytest.mark.parametrize("stream", [False, True])
def test_a_stop_string_ends_the_text_before_it_and_counts_tokens_up_to_it(bundle, engine,
                                                                          bpe_tokenizer,
                                                                          endpoint, stream):
    method, _, body, _, _ = endpoint
    chat = method == "create_chat_completion"
    reply_ids = ids(bpe_tokenizer, REPLY)
    k = first_prefix_containing(bpe_tokenizer, reply_ids, "Goodbye")
    assert k < len(reply_ids)                       # the reply goes on after the stop
    params = {"stop": ["never-said", "Goodbye"]}
    if stream:
        params.update(stream=True, stream_options={"include_usage": True})
    result, _ = serve(bundle, engine, method, body(**params))
    if stream:
        text = content(result, chat)
        finish = [c["choices"][0]["finish_reason"] for c in result if c["choices"]][-1]
        usage = result[-1]["usage"]
    else:
        choice = result["choices"][0]
        text = choice["message"]["content"] if chat else choice["text"]
        finish, usage = choice["finish_reason"], result["usage"]
    assert text == REPLY[: REPLY.index("Goodbye")]
    assert finish == "stop"
    assert usage["completion_tokens"] == k
    assert usage["total_tokens"] == usage["prompt_tokens"] + k


def test_a_stop_string_that_never_comes_changes_nothing(bundle, engine):
    result, _ = serve(bundle, engine, "create_completion", completion_body(stop="xyz"))
    assert result["choices"][0]["text"] == REPLY


def test_a_multibyte_reply_is_never_split(bundle, bpe_tokenizer):
    reply = "Café, naïve 日本語 🎉🚀 done."
    engine = FakeEngine(bpe_tokenizer, default=reply)
    result, _ = serve(bundle, engine, "create_chat_completion", chat_body(stream=True))
    pieces = [c["choices"][0]["delta"].get("content") for c in result if c["choices"]]
    assert all("\ufffd" not in p for p in pieces if p)
    assert content(result, chat=True) == reply


# --- streams ---------------------------------------------------------------------------------

@pytest.mark.parametrize("include_usage", [False, True])
def test_chat_stream_chunks(bundle, engine, bpe_tokenizer, include_usage):
    body = chat_body(stream=True, stream_options={"include_usage": include_usage})
    chunks, stack = serve(bundle, engine, "create_chat_completion", body)
    assert len({c["id"] for c in chunks}) == 1 and chunks[0]["id"].startswith("chatcmpl-")
    assert len({c["created"] for c in chunks}) == 1
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == bundle.name
               for c in chunks)
    first = chunks[0]["choices"][0]
    assert first["delta"]["role"] == "assistant" and first["finish_reason"] is None
    assert all("role" not in c["choices"][0]["delta"] for c in chunks[1:] if c["choices"])
    with_choices = [c for c in chunks if c["choices"]]
    assert [c["choices"][0]["finish_reason"] for c in with_choices] == \
        [None] * (len(with_choices) - 1) + ["stop"]
    assert content(chunks, chat=True) == REPLY
    n_prompt = len(ids(bpe_tokenizer, chatml(QUESTION)))
    n_reply = len(ids(bpe_tokenizer, REPLY))
    if include_usage:
        last = chunks[-1]
        assert last["choices"] == []
        assert last["usage"] == {"prompt_tokens": n_prompt, "completion_tokens": n_reply + 1,
                                 "total_tokens": n_prompt + n_reply + 1,
                               "prompt_tokens_details": {"cached_tokens": 0}}
        assert all(c["usage"] is None for c in chunks[:-1])
    else:
        assert all("usage" not in c for c in chunks) and chunks[-1]["choices"]
    assert stack.requests(CHAT, 200) == 1
    assert stack.sample("edgegen_request_duration_seconds_count", {"endpoint": CHAT}) == 1


@pytest.mark.parametrize("include_usage", [False, True])
def test_completion_stream_chunks(bundle, engine, bpe_tokenizer, include_usage):
    body = completion_body(stream=True, max_tokens=5,
                           stream_options={"include_usage": include_usage})
    chunks, stack = serve(bundle, engine, "create_completion", body)
    assert all(c["object"] == "text_completion" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1 and chunks[0]["id"].startswith("cmpl-")
    with_choices = [c for c in chunks if c["choices"]]
    assert [c["choices"][0]["finish_reason"] for c in with_choices] == \
        [None] * (len(with_choices) - 1) + ["length"]
    assert content(chunks, chat=False) == bpe_tokenizer.decode(ids(bpe_tokenizer, REPLY)[:5])
    if include_usage:
        n_prompt = len(ids(bpe_tokenizer, QUESTION))
        assert chunks[-1]["choices"] == []
        assert chunks[-1]["usage"] == {"prompt_tokens": n_prompt, "completion_tokens": 5,
                                       "total_tokens": n_prompt + 5,
                                       "prompt_tokens_details": {"cached_tokens": 0}}
    else:
        assert all("usage" not in c for c in chunks)
    assert stack.requests(COMPLETIONS, 200) == 1


def test_closing_a_stream_cancels_the_generation_and_frees_its_slot(bundle, bpe_tokenizer):
    engine = FakeEngine(bpe_tokenizer, context_length=2048, default=Reply("la ", eos=False))

    async def go():
        async with serving_stack(bundle, engine, max_concurrency=1, queue_size=0) as stack:
            stream = await stack.serving.create_chat_completion(chat_body(stream=True,
                                                                          max_tokens=1000))
            got = [await anext(stream) for _ in range(3)]
            await stream.aclose()
            idle = await stack.host.wait_idle(5)
            return got, idle, stack.host.inflight(), stack.host.ready()
    got, idle, inflight, ready = run(go())
    assert got[0]["choices"][0]["delta"]["role"] == "assistant"
    assert idle and inflight == 0 and ready == (True, "ready")
    assert engine.released == 1 and sum(engine.batches) < 1000


# --- backpressure, engine failures, metrics ---------------------------------------------------

def test_a_full_queue_is_a_429_with_retry_after(bundle, bpe_tokenizer):
    gate = threading.Event()
    engine = FakeEngine(bpe_tokenizer, default="Hello.", gate=gate)

    async def go():
        async with serving_stack(bundle, engine, max_concurrency=1, queue_size=1) as stack:
            assert stack.host.ready() == (True, "ready")
            gate.clear()                                  # hold the first sequence's prefill
            running = await stack.serving.create_chat_completion(chat_body(stream=True))
            queued = await stack.serving.create_completion(completion_body(stream=True))
            refused = await stack.serving.create_chat_completion(chat_body())
            refused_too = await stack.serving.create_completion(completion_body(stream=True))
            ready_when_full = stack.host.ready()
            gate.set()
            answers = [await drain(running), await drain(queued)]
            return refused, refused_too, ready_when_full, answers, stack
    refused, refused_too, ready_when_full, answers, stack = run(go())
    for result in (refused, refused_too):
        err = assert_error(result, 429, code="queue_full")
        assert err["type"] == "rate_limited"
        assert result.headers["Retry-After"] == "1"      # nothing has finished yet
    assert ready_when_full == (False, "queue full")
    assert content(answers[0], chat=True) == "Hello." and content(answers[1], chat=False) == \
        "Hello."
    assert stack.requests(CHAT, 429) == 1 and stack.requests(COMPLETIONS, 429) == 1
    assert stack.requests(CHAT, 200) == 1 and stack.requests(COMPLETIONS, 200) == 1


@pytest.mark.parametrize("failure", [GenerationError("injected engine failure"),
                                     RuntimeError("injected engine failure")])
@pytest.mark.parametrize("fail_at", [0, 3])
def test_an_engine_step_that_raises_is_a_500(bundle, bpe_tokenizer, endpoint, failure, fail_at):
    method, label, body, _, _ = endpoint
    engine = FakeEngine(bpe_tokenizer, default=REPLY, fail_at=fail_at, failure=failure)
    result, stack = serve(bundle, engine, method, body())
    err = assert_error(result, 500)
    assert err["type"] == "server_error"
    if isinstance(failure, GenerationError):      # the runtime's failure, told to the client
        assert "injected engine failure" in err["message"]
    assert stack.requests(label, 500) == 1 and stack.requests(label, 200) == 0


@pytest.mark.parametrize("fail_at", [0, 3])
def test_an_engine_step_that_raises_mid_stream_ends_it_with_an_error_chunk(bundle, bpe_tokenizer,
                                                                          endpoint, fail_at):
    method, label, body, _, _ = endpoint
    chat = method == "create_chat_completion"
    engine = FakeEngine(bpe_tokenizer, default=REPLY, fail_at=fail_at)
    chunks, stack = serve(bundle, engine, method,
                          body(stream=True, stream_options={"include_usage": True}))
    assert set(chunks[-1]) == {"error"}
    assert chunks[-1]["error"]["type"] == "server_error"
    assert "injected engine failure" in chunks[-1]["error"]["message"]
    assert content(chunks[:-1], chat) == bpe_tokenizer.decode(ids(bpe_tokenizer, REPLY)[:fail_at])
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    assert stack.requests(label, 200) == 1         # counted when the stream started


def test_after_an_engine_failure_the_next_request_is_served(bundle, bpe_tokenizer):
    engine = FakeEngine(bpe_tokenizer, replies={"fail": Reply("la ", eos=False)},
                        default="Fine.", fail_at=20)

    async def go():
        async with serving_stack(bundle, engine) as stack:
            failed = await stack.serving.create_chat_completion(chat_body("please fail"))
            ok = await stack.serving.create_chat_completion(chat_body("hello"))
            return failed, ok
    failed, ok = run(go())
    assert_error(failed, 500)
    assert ok["choices"][0]["message"]["content"] == "Fine."


def test_the_requests_counter_counts_each_outcome_by_status(bundle, bpe_tokenizer):
    engine = FakeEngine(bpe_tokenizer, default="Hi.")

    async def go():
        async with serving_stack(bundle, engine) as stack:
            s = stack.serving
            await s.create_chat_completion(chat_body())
            await drain(await s.create_chat_completion(chat_body(stream=True)))
            await s.create_chat_completion(chat_body(logit_bias={"1": 5}))
            await s.create_chat_completion(chat_body(model="other"))
            await s.create_completion(completion_body())
            await s.create_completion(completion_body(temperature=9))
            return stack.metrics.render().decode()
    text = run(go())
    lines = {line for line in text.splitlines() if line.startswith("edgegen_requests_total")}
    assert lines == {
        f'edgegen_requests_total{{endpoint="{CHAT}",status="200"}} 2.0',
        f'edgegen_requests_total{{endpoint="{CHAT}",status="400"}} 1.0',
        f'edgegen_requests_total{{endpoint="{CHAT}",status="404"}} 1.0',
        f'edgegen_requests_total{{endpoint="{COMPLETIONS}",status="200"}} 1.0',
        f'edgegen_requests_total{{endpoint="{COMPLETIONS}",status="400"}} 1.0',
    }


# --- embeddings and models --------------------------------------------------------------------

def test_embeddings(embedding_bundle, bpe_tokenizer):
    engine = FakeEmbeddingEngine(bpe_tokenizer, dim=8)
    texts = ["Hello there", "The capital of France"]
    result, stack = serve(embedding_bundle, engine, "create_embedding", {"input": texts})
    assert result["object"] == "list" and result["model"] == embedding_bundle.name
    assert [d["index"] for d in result["data"]] == [0, 1]
    assert all(d["object"] == "embedding" and len(d["embedding"]) == 8 for d in result["data"])
    tokens = sum(len(bpe_tokenizer.encode(t).ids) for t in texts)
    assert result["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}
    assert stack.requests(EMBEDDINGS, 200) == 1
    # base64 is the same float32 vector, little-endian
    b64, _ = serve(embedding_bundle, engine, "create_embedding",
                   {"input": "Hello there", "encoding_format": "base64"})
    vector = np.frombuffer(base64.b64decode(b64["data"][0]["embedding"]), dtype="<f4")
    assert np.allclose(vector, result["data"][0]["embedding"])


def test_embedding_errors(embedding_bundle, bpe_tokenizer):
    engine = FakeEmbeddingEngine(bpe_tokenizer, context_length=8)
    result, _ = serve(embedding_bundle, engine, "create_embedding",
                      {"input": ["short", "The quick brown fox jumps over the lazy dog."]})
    err = assert_error(result, 400, "input", "context_length_exceeded")
    assert "input[1]" in err["message"]
    result, _ = serve(embedding_bundle, engine, "create_embedding", {"input": [""]})
    assert_error(result, 400, "input")
    result, _ = serve(embedding_bundle, engine, "create_embedding",
                      {"input": "hi", "model": "other"})
    assert_error(result, 404, "model", "model_not_found")
    assert engine.calls == []
    failing = FakeEmbeddingEngine(bpe_tokenizer, fail=GenerationError("injected embed failure"))
    result, stack = serve(embedding_bundle, failing, "create_embedding", {"input": "hi"})
    err = assert_error(result, 500)
    assert "injected embed failure" in err["message"]
    assert stack.requests(EMBEDDINGS, 500) == 1


def test_models_lists_the_served_bundle(bundle, engine):
    async def go():
        async with serving_stack(bundle, engine) as stack:
            return stack.serving.models.list_models(), stack.serving.models.bundle_info()
    models, info = run(go())
    assert [m["id"] for m in models["data"]] == [bundle.name]
    assert models["data"][0]["max_model_len"] == bundle.context_length
    assert info["digest"] == bundle.digest and info["task"] == "text-generation"


def test_a_model_is_retrieved_as_its_models_entry_and_others_are_404s(bundle, engine):
    async def go():
        async with serving_stack(bundle, engine) as stack:
            models = stack.serving.models
            return (models.list_models(), models.retrieve_model(bundle.name),
                    models.retrieve_model("org/" + bundle.name))
    models, card, miss = run(go())
    assert card == models["data"][0]
    err = assert_error(miss, 404, "model", "model_not_found")
    assert err["type"] == "not_found_error" and "org/" + bundle.name in err["message"]


# --- the model host: readiness, drain, swap -----------------------------------------------------

def test_ready_says_draining_after_begin_drain_and_in_flight_requests_finish(bundle,
                                                                            bpe_tokenizer):
    gate = threading.Event()
    engine = FakeEngine(bpe_tokenizer, default="Done.", gate=gate)

    async def go():
        async with serving_stack(bundle, engine) as stack:
            host = stack.host
            before = host.ready()
            gate.clear()
            stream = await stack.serving.create_chat_completion(chat_body(stream=True))
            host.begin_drain()
            draining = host.ready()
            gate.set()
            answer = content(await drain(stream), chat=True)
            return before, draining, host.ready(), answer, await host.wait_idle(1)
    before, draining, after, answer, idle = run(go())
    assert before == (True, "ready")
    assert draining == (False, "draining") and after == (False, "draining")
    assert answer == "Done." and idle


def test_wait_idle_returns_when_the_last_request_finishes(bundle, bpe_tokenizer):
    gate = threading.Event()
    engine = FakeEngine(bpe_tokenizer, default="Done.", gate=gate)

    async def go():
        async with serving_stack(bundle, engine, max_concurrency=1, queue_size=2) as stack:
            host = stack.host
            assert await host.wait_idle(0.1)             # nothing in flight
            gate.clear()
            streams = [await stack.serving.create_chat_completion(chat_body(stream=True))
                       for _ in range(2)]
            inflight = host.inflight()
            timed_out = await host.wait_idle(0.1)         # held at the gate: not idle
            waiter = asyncio.create_task(host.wait_idle(5))
            await asyncio.sleep(0.05)
            still_waiting = not waiter.done()
            gate.set()
            first = await drain(streams[0])
            idle = await waiter
            inflight_after = host.inflight()
            second = await drain(streams[1])
            return inflight, timed_out, still_waiting, idle, inflight_after, first, second
    inflight, timed_out, still_waiting, idle, inflight_after, first, second = run(go())
    assert inflight == 2 and timed_out is False and still_waiting
    assert idle is True and inflight_after == 0
    assert content(first, chat=True) == content(second, chat=True) == "Done."


def test_swap_refuses_a_missing_bundle_and_one_of_another_task(bundle, embedding_bundle,
                                                               engine, tmp_path):
    async def go():
        async with serving_stack(bundle, engine) as stack:
            missing = await stack.host.swap(str(tmp_path / "nope"))
            other = await stack.host.swap(str(embedding_bundle.path))
            return missing, other, stack.host.model.bundle
    missing, other, served = run(go())
    assert_error(missing, 400, "path", "bad_bundle")
    err = assert_error(other, 400, "path")
    assert "feature-extraction" in err["message"]
    assert served == bundle
