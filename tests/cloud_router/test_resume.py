"""Continuing a broken stream elsewhere: which requests may be, the body that continues one,
and how the continuation's events join the client's stream (pure logic, on tables)."""

import json

import pytest

from cloud_router.resume import (
    DONE,
    RESUME_HEADER,
    Diverged,
    Transcript,
    replays_exactly,
    resumable,
    split_events,
)

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}
GREEDY = {**CHAT, "temperature": 0}


def event(delta: dict, finish=None, id_="a", created=1) -> bytes:
    return b"data: " + json.dumps({"id": id_, "created": created, "object":
                                   "chat.completion.chunk", "choices": [
                                       {"index": 0, "delta": delta,
                                        "finish_reason": finish}]}).encode() + b"\n\n"


@pytest.mark.parametrize("path, payload, expected", [
    ("/v1/chat/completions", CHAT, True),
    ("/v1/chat/completions", {**CHAT, "n": 1, "response_format": {"type": "text"}}, True),
    ("/v1/chat/completions", {**CHAT, "stream": False}, False),
    ("/v1/chat/completions", {**CHAT, "stream": "yes"}, False),
    ("/v1/chat/completions", {**CHAT, "n": 2}, False),            # choices interleave
    ("/v1/chat/completions", {**CHAT, "tools": [{"type": "function"}]}, False),
    ("/v1/chat/completions", {**CHAT, "response_format": {"type": "json_object"}}, False),
    ("/v1/chat/completions", {**CHAT, "response_format": "text"}, False),
    ("/v1/chat/completions", {**CHAT, "logprobs": True}, False),
    ("/v1/chat/completions", {**CHAT, "messages": "hi"}, False),
    ("/v1/completions", {"model": "m", "prompt": "hi", "stream": True}, False),
    ("/v1/chat/completions", [CHAT], False),
])
def test_which_streams_may_be_resumed(path, payload, expected):
    assert resumable(path, payload) is expected


def test_split_events_keeps_each_events_end():
    block = b"data: 1\n\ndata: 2\r\n\r\ndata: 3\n\n"
    assert split_events(block) == [b"data: 1\n\n", b"data: 2\r\n\r\n", b"data: 3\n\n"]


@pytest.mark.parametrize("params, exact", [
    ({"temperature": 0}, True),
    ({"temperature": 0.0, "top_p": 0.5}, True),
    ({"temperature": 0.7, "seed": 3}, True),
    ({"seed": 0}, True),
    ({}, False),                              # OpenAI's default temperature is 1
    ({"temperature": 0.7}, False),
    ({"temperature": True}, False),
    ({"temperature": "0"}, False),
    ({"seed": 1.5}, False),
    ({"seed": True}, False),
])
def test_greedy_and_seeded_requests_replay_exactly(params, exact):
    assert replays_exactly({**CHAT, **params}) is exact


def test_a_sampled_stream_is_continued_from_what_the_client_has():
    t = Transcript(CHAT)
    for e in (event({"role": "assistant", "content": ""}), event({"content": "Hel"}),
              event({"content": "lo, "})):
        t.record(e)
    body, headers = t.continuation()
    assert headers == {RESUME_HEADER: "1"}
    assert body["messages"] == [*CHAT["messages"], {"role": "assistant", "content": "Hello, "}]
    assert body["continue_final_message"] is True and body["add_generation_prompt"] is False
    assert CHAT["messages"] == [{"role": "user", "content": "hi"}]   # the original untouched
    assert (t.id, t.created, t.finished, t.done) == ("a", 1, False, False)


def test_a_client_continuing_its_own_message_has_it_extended():
    payload = {**CHAT, "messages": [*CHAT["messages"], {"role": "assistant", "content": "Once"}],
               "continue_final_message": True}
    t = Transcript(payload)
    t.record(event({"content": " upon"}))
    assert t.continuation()[0]["messages"][-1] == {"role": "assistant", "content": "Once upon"}
    assert payload["messages"][-1]["content"] == "Once"


def test_with_nothing_sent_yet_the_request_is_asked_again():
    t = Transcript(CHAT)
    t.record(event({"role": "assistant", "content": ""}))
    assert t.continuation() == (CHAT, {})


def replayed(t: Transcript, *contents: str) -> list[str | None]:
    """What the client gets of a replay's content chunks (None: dropped)."""
    out = []
    for content in contents:
        raw = t.rewrite(event({"content": content}, id_="second"))
        out.append(json.loads(raw[6:])["choices"][0]["delta"]["content"] if raw else None)
    return out


def test_a_greedy_stream_is_replayed_and_what_the_client_has_is_cut_away():
    t = Transcript(GREEDY)
    for piece in ("The ", "capital ", "is"):
        t.record(event({"content": piece}, id_="first"))
    assert t.continuation() == (GREEDY, {})   # the same request again, no resume header
    assert t.rewrite(event({"role": "assistant", "content": ""}, id_="second")) == b""
    # chunks cut differently this time: what the client has is dropped, the rest passes
    assert replayed(t, "The capital", " i", "s Paris", ".") == [None, None, " Paris", "."]
    assert t.text == "The capital is Paris."
    end = t.rewrite(event({}, finish="length", id_="second"))
    assert json.loads(end[6:])["choices"][0]["finish_reason"] == "length"


def test_a_replay_that_writes_other_text_cannot_be_joined():
    t = Transcript(GREEDY)
    t.record(event({"content": "The capital is"}))
    t.continuation()
    with pytest.raises(Diverged):
        replayed(t, "The capitol")


def test_a_replay_that_ends_before_it_caught_up_cannot_be_joined():
    t = Transcript(GREEDY)
    t.record(event({"content": "The capital is"}))
    t.continuation()
    replayed(t, "The ")
    with pytest.raises(Diverged):
        t.rewrite(event({}, finish="stop"))


def test_the_continuations_events_join_the_first_stream():
    t = Transcript(CHAT)
    t.record(event({"role": "assistant", "content": ""}, id_="first", created=7))
    t.record(event({"content": "a "}, id_="first", created=7))
    # the continuation opens with its own role chunk: dropped; its id becomes the first's
    assert t.rewrite(event({"role": "assistant", "content": ""}, id_="second")) == b""
    out = t.rewrite(event({"content": "b "}, id_="second", created=9))
    chunk = json.loads(out[len(b"data: "):])
    assert (chunk["id"], chunk["created"]) == ("first", 7)
    assert chunk["choices"][0]["delta"] == {"content": "b "}
    assert t.text == "a b "   # so a second break continues from here
    last = t.rewrite(event({}, finish="stop", id_="second"))
    assert json.loads(last[6:])["id"] == "first" and t.finished
    usage = b'data: {"id": "second", "choices": [], "usage": {"completion_tokens": 3}}\n\n'
    assert json.loads(t.rewrite(usage)[6:])["id"] == "first"
    assert t.rewrite(DONE) == DONE and t.done
    error = b'data: {"error": {"message": "x"}}\n\n'
    assert t.rewrite(error) == error


def test_events_that_are_not_chunks_are_noted_and_passed_as_they_are():
    t = Transcript(CHAT)
    t.record(b": keep-alive comment\n\n")
    t.record(b"data: not json\n\n")
    t.record(b"data: [1, 2]\n\n")
    assert t.text == "" and t.id is None
    assert t.rewrite(b"data: not json\n\n") == b"data: not json\n\n"
