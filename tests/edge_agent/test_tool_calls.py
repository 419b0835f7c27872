"""Tool calls in text (``serving.tool_calls``): the parser that reads calls while they stream,
and the prompts that show tools and earlier calls to the model. Pure, on tables."""

from __future__ import annotations

import json

import pytest

from edge_agent.serving.protocol import ChatMessage
from edge_agent.serving.tool_calls import (
    CallArguments,
    CallStart,
    ConversationError,
    ToolCallParser,
    call_prefix,
    call_text,
    prompt_messages,
    template_reads_tools,
)

WEATHER_ARGS = '{"city": "Paris", "tags": ["a}", "b\\"]"], "n": {"x": [1]}}'
WEATHER = call_text("get_weather", WEATHER_ARGS)
TIME = call_text("get_time", "{}")

# (mode, generated text, content, calls as (name, arguments))
CASES = [
    ("auto", "The weather is fine.", "The weather is fine.", []),
    ("auto", "<b>bold</b> text", "<b>bold</b> text", []),
    ("auto", "<tool_call", "<tool_call", []),                       # cut before a call
    ("auto", WEATHER, "", [("get_weather", json.loads(WEATHER_ARGS))]),
    ("required", WEATHER + "\n" + TIME, "",
     [("get_weather", None), ("get_time", {})]),
    ("required", TIME, "", [("get_time", {})]),
]


def parse(mode: str, pieces: list[str]):
    parser = ToolCallParser(mode)
    events = [e for piece in pieces for e in parser.feed(piece)] + parser.finish()
    content = "".join(e for e in events if isinstance(e, str))
    starts = [e for e in events if isinstance(e, CallStart)]
    arguments: dict[int, str] = {}
    for e in events:
        if isinstance(e, CallArguments):
            arguments[e.index] = arguments.get(e.index, "") + e.text
    streamed = [(s.name, arguments.get(s.index, "")) for s in starts]
    return content, streamed, parser


@pytest.mark.parametrize("mode, text, content, calls", CASES)
def test_every_split_of_the_text_reads_the_same(mode, text, content, calls):
    whole_content, whole_calls, parser = parse(mode, [text])
    assert whole_content == content
    assert [n for n, _ in whole_calls] == [n for n, _ in calls]
    for (name, arguments), (_, want) in zip(whole_calls, calls):
        parsed = json.loads(arguments)
        if want is not None:
            assert parsed == want
    # the calls the parser keeps are the streamed pieces, joined
    assert [(n, a) for _, n, a in parser.calls] == whole_calls
    for cut in range(1, len(text)):
        assert parse(mode, [text[:cut], text[cut:]])[:2] == (whole_content, whole_calls), cut
    pieces = [text[i:i + 3] for i in range(0, len(text), 3)]
    assert parse(mode, pieces)[:2] == (whole_content, whole_calls)


def test_calls_have_distinct_ids_and_stable_indexes():
    _, _, parser = parse("required", [WEATHER + "\n" + WEATHER])
    ids = [i for i, _, _ in parser.calls]
    assert len(set(ids)) == 2 and all(i.startswith("call_") for i in ids)


def test_arguments_stream_before_the_call_ends():
    parser = ToolCallParser("required")
    events = parser.feed(call_prefix("f") + '{"a": "long text')
    assert isinstance(events[0], CallStart) and events[0].name == "f"
    assert "".join(e.text for e in events[1:]) == '{"a": "long text'


def msg(**kw) -> ChatMessage:
    return ChatMessage.model_validate(kw)


CALL = {"id": "call_1", "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]


def test_default_format_shows_tools_calls_and_results():
    messages = [msg(role="user", content="Weather?"),
                msg(role="assistant", content=None, tool_calls=[CALL]),
                msg(role="tool", tool_call_id="call_1", content="sunny"),
                msg(role="tool", tool_call_id="call_1", content="22 C")]
    out = prompt_messages(messages, TOOLS, native=False)
    assert out[0]["role"] == "system" and json.dumps(TOOLS[0]) in out[0]["content"]
    assert out[2] == {"role": "assistant",
                      "content": call_text("get_weather", '{"city": "Paris"}')}
    # results of one batch of calls come back as one user turn (templates that demand
    # alternating roles accept it)
    assert out[3] == {"role": "user", "content": "<tool_response>\nsunny\n</tool_response>\n"
                                                 "<tool_response>\n22 C\n</tool_response>"}
    assert len(out) == 4


def test_the_tools_join_an_existing_system_message():
    out = prompt_messages([msg(role="system", content="Be brief."), msg(role="user", content="x")],
                          TOOLS, native=False)
    assert out[0]["content"].startswith("Be brief.\n\n") and "<tools>" in out[0]["content"]
    assert len(out) == 2


def test_native_templates_get_calls_and_results_as_transformers_passes_them():
    messages = [msg(role="assistant", content="", tool_calls=[CALL]),
                msg(role="tool", tool_call_id="call_1", content="sunny")]
    out = prompt_messages(messages, TOOLS, native=True)
    assert out == [
        {"role": "assistant", "content": "", "tool_calls": [{
            "id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": "sunny", "tool_call_id": "call_1"}]
    assert template_reads_tools("{% for t in tools %}{{ m.tool_calls }}{% endfor %}")
    assert not template_reads_tools("{{ messages }}")


@pytest.mark.parametrize("messages, param", [
    ([msg(role="tool", tool_call_id="call_9", content="x")], "messages.0.tool_call_id"),
    ([msg(role="assistant", tool_calls=[CALL]), msg(role="tool", tool_call_id="nope",
                                                    content="x")], "messages.1.tool_call_id"),
    ([msg(role="assistant", tool_calls=[{**CALL, "function": {"name": "f", "arguments": "{"}}])],
     "messages.0.tool_calls.0.function.arguments"),
])
def test_tool_messages_that_do_not_fit_name_the_field(messages, param):
    with pytest.raises(ConversationError) as err:
        prompt_messages(messages, TOOLS, native=False)
    assert err.value.param == param
