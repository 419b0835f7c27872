"""Continuing the final assistant message (vLLM's ``continue_final_message``), and resuming a
generation cut short elsewhere (``RESUME_HEADER``, what the router sends), on the fake engine
with the real template, tokenizer, scheduler and response builders."""

from __future__ import annotations

import pytest

from edge_agent.serving.generation import ChunkStream
from tests.edge_agent.test_serving import assert_error, chatml, run
from tests.support.fake_engine import FakeEngine, Reply, serving_stack, write_fake_bundle

pytestmark = pytest.mark.timeout(30)

QUESTION = "What is the capital of France?"
PARTIAL = "The capital of France"


@pytest.fixture(scope="module")
def bundle(bpe_tokenizer_dir, tmp_path_factory):
    return write_fake_bundle(bpe_tokenizer_dir, tmp_path_factory.mktemp("continue-store"))


def continuing(partial: str = PARTIAL, **params) -> dict:
    return {"messages": [{"role": "user", "content": QUESTION},
                         {"role": "assistant", "content": partial}],
            "continue_final_message": True, **params}


def chat(bundle, engine, body: dict, resume: bool = False):
    """One chat request on a fresh stack: the result (a stream read to its end)."""
    async def go():
        async with serving_stack(bundle, engine) as stack:
            result = await stack.serving.create_chat_completion(body, resume=resume)
            if isinstance(result, ChunkStream):
                return [chunk async for chunk in result]
            return result
    return run(go())


def prompt_text(engine: FakeEngine) -> str:
    return engine.tokenizer.decode(engine.prompts[-1], skip_special_tokens=False)


def tokens(engine: FakeEngine, text: str) -> int:
    return len(engine.tokenizer.encode(text, add_special_tokens=False).ids)


def test_the_final_message_is_continued_not_closed(bundle, bpe_tokenizer):
    engine = FakeEngine(bpe_tokenizer, default=Reply(" is Paris."))
    out = chat(bundle, engine, continuing())
    # the prompt stops inside the assistant's message: no end of turn, no new opener
    assert prompt_text(engine) == chatml(QUESTION) + PARTIAL
    assert out["choices"][0]["message"]["content"] == " is Paris."
    # without the resume header the continued text is prompt, as vLLM counts it
    assert out["usage"]["prompt_tokens"] == len(engine.prompts[-1])


def test_without_a_generation_prompt_the_conversation_ends_as_it_is(bundle, bpe_tokenizer):
    engine = FakeEngine(bpe_tokenizer, default=Reply("ok"))
    body = {"messages": [{"role": "user", "content": QUESTION}], "add_generation_prompt": False}
    chat(bundle, engine, body)
    assert prompt_text(engine) == chatml(QUESTION).removesuffix("<|im_start|>assistant\n")


def test_a_resumed_generation_counts_the_continued_tokens_as_its_own(bundle, bpe_tokenizer):
    engine = FakeEngine(bpe_tokenizer, default=Reply("la ", eos=False))
    partial = "la la la "
    k = tokens(engine, partial)
    out = chat(bundle, engine, continuing(partial, max_tokens=10), resume=True)
    whole = len(engine.prompts[-1])
    assert out["usage"] == {**out["usage"], "prompt_tokens": whole - k,
                            "completion_tokens": 10, "total_tokens": whole + 10 - k}
    # the budget is the original request's: what was generated before counts against it
    assert tokens(engine, out["choices"][0]["message"]["content"]) == 10 - k
    assert out["choices"][0]["finish_reason"] == "length"


def test_a_resumed_stream_reports_the_usage_of_the_whole_generation(bundle, bpe_tokenizer):
    engine = FakeEngine(bpe_tokenizer, default=Reply(" is Paris."))
    body = continuing(stream=True, stream_options={"include_usage": True})
    chunks = chat(bundle, engine, body, resume=True)
    usage = chunks[-1]["usage"]
    # the message's tokens before the cut, after it, and the end of turn
    assert usage["completion_tokens"] == (tokens(engine, PARTIAL) + tokens(engine, " is Paris.")
                                          + 1)
    assert usage["prompt_tokens"] == tokens(engine, chatml(QUESTION))


@pytest.mark.parametrize("body, param", [
    ({"messages": [{"role": "user", "content": QUESTION}], "continue_final_message": True},
     "messages"),
    (continuing("   "), "messages"),
    (continuing(add_generation_prompt=True), "add_generation_prompt"),
    (continuing(continue_final_message="yes"), "continue_final_message"),
])
def test_what_cannot_be_continued_is_a_400(bundle, bpe_tokenizer, body, param):
    engine = FakeEngine(bpe_tokenizer, default=Reply("x"))
    assert_error(chat(bundle, engine, body), 400, param)
    assert engine.prompts == []


def test_resuming_a_message_that_used_the_whole_budget_is_a_400(bundle, bpe_tokenizer):
    engine = FakeEngine(bpe_tokenizer, default=Reply("la ", eos=False))
    body = continuing("la la la ", max_tokens=tokens(engine, "la la la "))
    assert_error(chat(bundle, engine, body, resume=True), 400, "max_tokens")
    assert engine.prompts == []
