"""Prompt-prefix keys, the affinity table, and load reports (pure, on tables)."""

import pytest

from cloud_router.affinity import (
    BLOCK_CHARS,
    AffinityTable,
    LoadReport,
    parse_load_report,
    prefix_keys,
)

CHAT = "/v1/chat/completions"
SYSTEM = {"role": "system", "content": "You are a helpful assistant. " * 40}


def turn(*exchanges: str) -> dict:
    """A chat whose history holds ``exchanges`` (user, assistant, user, ...)."""
    roles = ("user", "assistant")
    return {"model": "m", "messages": [SYSTEM, *({"role": roles[i % 2], "content": text}
                                                  for i, text in enumerate(exchanges))]}


def test_each_turn_of_a_chat_finds_the_previous_turns_whole_prompt():
    first = prefix_keys(CHAT, turn("Hi"))
    second = prefix_keys(CHAT, turn("Hi", "Hello! How can I help?", "Tell me a joke"))
    assert [chars for _k, chars in first] == sorted((c for _k, c in first), reverse=True)
    assert first[0] in second          # turn 1's whole prompt is a prefix of turn 2's
    assert first[-1] == second[-1]     # and both start with the system prompt
    other_system = prefix_keys(CHAT, {**turn("Hi"), "messages": [
        {"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"}]})
    assert not set(first) & set(other_system)
    other_model = prefix_keys(CHAT, {**turn("Hi"), "model": "n"})
    assert not set(first) & set(other_model)


@pytest.mark.parametrize("payload", [
    None, [], "text", {"model": "m"}, {"model": "m", "messages": "hi"},
    {"model": "m", "prompt": "short"},   # under one block: nothing worth keying
])
def test_requests_without_a_keyable_prompt_have_no_keys(payload):
    assert prefix_keys(CHAT if isinstance(payload, dict) and "messages" in payload
                       else "/v1/completions", payload) == ()


def test_odd_messages_are_keyed_without_failing():
    keys = prefix_keys(CHAT, {"model": "m", "messages": [
        "not an object", {"role": "user", "content": [{"type": "text", "text": "parts"}]},
        {"role": "user", "content": "\ud800 lone surrogate"}, {"role": "user"}]})
    assert len(keys) == 4


def test_completion_prompts_are_keyed_by_blocks():
    prompt = "x" * (BLOCK_CHARS * 3 + 10)
    keys = prefix_keys("/v1/completions", {"model": "m", "prompt": prompt})
    assert [c for _k, c in keys] == [3 * BLOCK_CHARS, 2 * BLOCK_CHARS, BLOCK_CHARS]
    longer = prefix_keys("/v1/completions", {"model": "m", "prompt": prompt + "y" * 300})
    assert set(keys) <= set(longer)


def test_the_table_says_how_much_of_a_prompt_each_endpoint_holds():
    table = AffinityTable(capacity=6, holders=2)
    first = prefix_keys(CHAT, turn("Hi"))                               # 2 keys
    second = prefix_keys(CHAT, turn("Hi", "Hello!", "A joke, please"))  # 4, 2 of them first's
    table.record(first, "edge-a")
    assert table.lookup(second) == {"edge-a": first[0][1]}
    table.record(second, "edge-b")   # b holds all of it; a still holds what it was sent
    assert table.lookup(second) == {"edge-b": second[0][1], "edge-a": first[0][1]}
    table.record(first, "edge-c")    # at most two holders per key, the latest first
    assert table.lookup(first) == {"edge-c": first[0][1], "edge-b": first[0][1]}
    assert len(table) == 4
    table.forget("edge-b")
    assert table.lookup(second) == {"edge-c": first[0][1]}
    assert len(table) == 2           # keys only b held are gone
    for n in range(5):               # at most six keys: the least recently used go first
        table.record(prefix_keys(CHAT, turn(f"Other {n}"))[:1], "edge-d")
    # first's keys were used longest first: its whole prompt went, its system prompt stays
    assert len(table) == 6 and table.lookup(first) == {"edge-c": first[-1][1]}


@pytest.mark.parametrize("header, report", [
    ("TEXT named_metrics.num_requests_waiting=2, named_metrics.num_requests_running=3, "
     "named_metrics.kv_cache_usage_perc=0.25", LoadReport(2, 3, 0.25)),
    ("text named_metrics.num_requests_waiting=0", LoadReport(0, 0, 0.0)),
    ("TEXT num_requests_running=1.0,kv_cache_usage_perc=1", LoadReport(0, 1, 1.0)),
    ("TEXT named_metrics.something_else=7", LoadReport(0, 0, 0.0)),
])
def test_load_reports_are_read(header, report):
    assert parse_load_report(header) == report


@pytest.mark.parametrize("header", [
    "JSON {\"named_metrics\": {}}",                              # a format not asked for
    "TEXT named_metrics.num_requests_waiting",                   # no value
    "TEXT named_metrics.num_requests_waiting=many",
    "TEXT named_metrics.num_requests_waiting=-1",                # impossible figures
    "TEXT named_metrics.num_requests_waiting=2.5",
    "TEXT named_metrics.num_requests_waiting=nan",
    "TEXT named_metrics.num_requests_running=inf",
    "TEXT named_metrics.num_requests_running=1e12",
    "TEXT named_metrics.kv_cache_usage_perc=1.5",
    "TEXT named_metrics.kv_cache_usage_perc=-0.1",
    "",
])
def test_impossible_or_malformed_load_reports_are_refused(header):
    with pytest.raises(ValueError):
        parse_load_report(header)
