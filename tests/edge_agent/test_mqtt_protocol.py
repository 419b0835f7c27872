"""The MQTT contract's pure parts on plain data: broker URLs, credentials, request parsing (with
REST's limits), reply routes and their namespace, the scan of unparsed payloads, the ACL,
chunk merging and coalescing."""

import json

import pytest

from edge_agent.errors import MqttConfigError
from edge_agent.mqtt.bridge import FirstSeen
from edge_agent.mqtt.coalescer import ChunkCoalescer, merge_chunks
from edge_agent.mqtt.contract import (
    ChatRequest,
    RejectedRequest,
    ReplyRoute,
    broker_acl,
    in_reply_namespace,
    is_final,
    parse_broker_url,
    parse_request,
    reply_bytes,
    request_topic,
    scan_reply_route,
    shared_subscription,
    valid_node_name,
    with_credentials,
)

GOOD = {"messages": [{"role": "user", "content": "hi"}]}
R1, R2, R9 = (f"edgegen/v1/reply/dev-{i}" for i in (1, 2, 9))


def test_topics_follow_the_contract():
    assert request_topic("n1") == "edgegen/v1/n1/chat"
    assert request_topic(None) == "edgegen/v1/any/chat"
    assert shared_subscription() == "$share/edgegen/edgegen/v1/any/chat"


@pytest.mark.parametrize("url, host, port, tls, user, password", [
    ("mqtt://127.0.0.1:1884", "127.0.0.1", 1884, False, None, None),
    ("mqtt://broker", "broker", 1883, False, None, None),
    ("mqtts://broker", "broker", 8883, True, None, None),
    ("mqtts://dev%40x:p%3Ass@b:8884/", "b", 8884, True, "dev@x", "p:ss"),
])
def test_broker_urls(url, host, port, tls, user, password):
    b = parse_broker_url(url)
    assert (b.host, b.port, b.tls, b.username, b.password) == (host, port, tls, user, password)
    assert "ss" not in b.redacted() and "pass" not in repr(b)


@pytest.mark.parametrize("url, problem", [
    ("http://broker:1883", "scheme"),
    ("mqtt://:1883", "no host"),
    ("mqtt://broker:99999", "bad MQTT broker URL"),
    ("mqtt://broker/topic", "no path"),
])
def test_bad_broker_urls_name_the_problem(url, problem):
    with pytest.raises(MqttConfigError, match=problem):
        parse_broker_url(url)


def parse(payload, **kw):
    return parse_request(payload, max_payload=kw.pop("max_payload", 1000), **kw)


def test_v5_route_comes_from_the_properties():
    r = parse(json.dumps(GOOD).encode(), response_topic=R1, correlation_data=b"\x00id")
    assert r == ChatRequest(GOOD, ReplyRoute(R1, b"\x00id"))


def test_v311_route_comes_from_the_body_and_is_removed_from_it():
    r = parse(json.dumps({**GOOD, "reply_to": R2, "correlation_id": 7}).encode())
    assert r == ChatRequest(GOOD, ReplyRoute(R2, 7, in_body=True))


def test_v5_properties_win_over_body_fields():
    r = parse(json.dumps({**GOOD, "reply_to": R2}).encode(), response_topic=R1)
    assert r.reply == ReplyRoute(R1, None) and "reply_to" not in r.body


def test_no_route_is_a_request_with_no_reply():
    assert parse(json.dumps(GOOD).encode()) == ChatRequest(GOOD, None)


@pytest.mark.parametrize("payload, code", [
    (b"{not json", "invalid_json"),
    (b"\xff\xfe{}", "invalid_utf8"),
    (b"[1, 2]", "not_a_chat_request"),
    (b'"hello"', "not_a_chat_request"),
    (b'{"prompt": "hi"}', "not_a_chat_request"),
    (b'{"messages": "hi"}', "not_a_chat_request"),
    (b"[" * 100_000, "invalid_json"),
    (b"x" * 1001, "payload_too_large"),
])
def test_bad_payloads_are_rejected_with_a_code_and_keep_the_v5_route(payload, code):
    r = parse(payload, max_payload=1000 if code == "payload_too_large" else 10**6,
              response_topic=R1, correlation_data=b"c")
    assert isinstance(r, RejectedRequest)
    assert r.code == code and r.reply == ReplyRoute(R1, b"c")
    assert r.error["error"]["code"] == code and r.error["error"]["message"]
    assert r.error["error"]["type"] == "invalid_request_error"


def test_bad_v311_body_keeps_its_route():
    r = parse(json.dumps({"reply_to": R9, "correlation_id": "a", "prompt": "x"}).encode())
    assert isinstance(r, RejectedRequest) and r.reply == ReplyRoute(R9, "a", in_body=True)


@pytest.mark.parametrize("reply_to", ["edgegen/v1/reply/+", "edgegen/v1/reply/#", "", 5,
                                      None])
def test_unusable_reply_to_means_no_route(reply_to):
    r = parse(json.dumps({**GOOD, "reply_to": reply_to}).encode())
    assert isinstance(r, RejectedRequest) and r.reply is None and r.code == "invalid_reply_to"


@pytest.mark.parametrize("payload, code, param", [
    (b'{"messages": [], "temperature": NaN}', "invalid_json", None),
    (b'{"messages": [], "x": Infinity}', "invalid_json", None),
    (b'{"messages": ' + b"[" * 70 + b"]" * 70 + b"}", "invalid_json", None),
    (b'{"messages": [{"role": "user", "content": "\\ud800"}]}', "invalid_utf8",
     "messages.0.content"),
    (b'{"messages": [], "\xed\xa0\x80": 1}', "invalid_utf8", None),
])
def test_the_rest_limits_apply_to_mqtt_payloads(payload, code, param):
    """decode_json, REST's own: the same error body a REST client gets for the same bytes."""
    from edge_agent.serving.bodies import decode_json

    r = parse(payload, response_topic=R1)
    assert isinstance(r, RejectedRequest) and r.reply == ReplyRoute(R1, None)
    assert r.code == code and r.error == decode_json(payload).body
    assert r.error["error"]["type"] == "invalid_request_error"
    assert r.error["error"]["param"] == param


@pytest.mark.parametrize("topic, ok", [
    ("edgegen/v1/reply/dev-1", True),
    ("edgegen/v1/reply/a/b", True),              # client id "a/b": its exact topic
    ("edgegen/v1/reply/", False),
    ("edgegen/v1/reply", False),
    ("edgegen/v1/reply/chat", False),            # also node "reply"'s request topic
    ("edgegen/v1/reply/+", False),
    ("edgegen/v1/n1/chat", False),
    ("devices/x/reply", False),
    ("", False),
    (None, False),
])
def test_the_reply_namespace(topic, ok):
    assert in_reply_namespace(topic) is ok


@pytest.mark.parametrize("route", [
    {"response_topic": "devices/x"},
    {"response_topic": "edgegen/v1/n1/chat"},
])
def test_a_v5_route_outside_the_namespace_is_refused_without_a_reply(route):
    for payload in (json.dumps(GOOD).encode(), b"{bad", b"x" * 2000):
        r = parse(payload, **route)
        assert isinstance(r, RejectedRequest) and r.reply is None
        assert r.code == "reply_route_forbidden" and r.refused_route == route["response_topic"]


def test_a_v311_route_outside_the_namespace_is_refused_without_a_reply():
    r = parse(json.dumps({**GOOD, "reply_to": "devices/x", "correlation_id": 1}).encode())
    assert r.code == "reply_route_forbidden" and r.reply is None
    assert r.refused_route == "devices/x" and r.error["error"]["param"] == "reply_to"


def big(route: bytes, filler: int = 5000, *, at: str = "start") -> bytes:
    """A 3.1.1 request of ``filler`` bytes of text with ``route`` first or last."""
    text = json.dumps({"messages": [{"role": "user", "content": "y" * filler}]}).encode()
    if at == "start":
        return b"{" + route + b", " + text[1:]
    return text[:-1] + b", " + route + b"}"


@pytest.mark.parametrize("at", ["start", "end"])
@pytest.mark.parametrize("filler", [5000, 300_000])
def test_an_oversize_v311_payload_is_answered_on_its_scanned_route(at, filler):
    payload = big(b'"reply_to": "' + R1.encode() + b'", "correlation_id": "c-1"', filler, at=at)
    r = parse(payload, max_payload=1000)
    assert isinstance(r, RejectedRequest) and r.code == "payload_too_large"
    assert r.reply == ReplyRoute(R1, "c-1", in_body=True)
    assert r.error["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize("route, expected", [
    (b'"reply_to":"edgegen/v1/reply/d","correlation_id":42', ReplyRoute(
        "edgegen/v1/reply/d", 42, in_body=True)),
    (b'"reply_to" :\n "edgegen/v1/reply/d"', ReplyRoute("edgegen/v1/reply/d", None,
                                                       in_body=True)),
    (b'"correlation_id": {"a": 1}, "reply_to": "edgegen/v1/reply/d"',
     ReplyRoute("edgegen/v1/reply/d", None, in_body=True)),
    (b'"reply_to": "devices/elsewhere"', None),                 # outside the namespace
    (b'"reply_to": "edgegen\\/v1\\/reply\\/d"', None),           # escaped: not trusted
    (b'"reply_to": "edgegen/v1/reply/+"', None),
    (b'"reply_to": "edgegen/v1/reply/\xff"', None),             # not UTF-8
    (b'"content": "\\"reply_to\\": \\"edgegen/v1/reply/v\\""', None),  # inside a string
    (b'"x": 1', None),
])
def test_the_scanned_route_is_trusted_only_when_plain_and_in_the_namespace(route, expected):
    assert scan_reply_route(big(route)) == expected


def test_the_scan_is_bounded_to_the_ends_of_the_payload():
    middle = json.dumps({"a": "y" * 100_000, "reply_to": R1, "b": "y" * 100_000}).encode()
    assert scan_reply_route(middle) is None
    r = parse(middle, max_payload=1000)
    assert r.code == "payload_too_large" and r.reply is None


def test_an_undecodable_v311_payload_is_answered_on_its_scanned_route():
    r = parse(b'{"reply_to": "' + R1.encode() + b'", "messages": [' + b"[" * 100 + b"]" * 100
              + b"]}")
    assert r.code == "invalid_json" and r.reply == ReplyRoute(R1, None, in_body=True)
    r = parse(b'{"reply_to": "' + R1.encode() + b'", "correlation_id": 5, "m": "\xff"}')
    assert r.code == "invalid_utf8" and r.reply == ReplyRoute(R1, 5, in_body=True)


def test_credentials_given_apart_win_over_the_url():
    url = parse_broker_url("mqtt://u:p@h:1")
    assert with_credentials(url, None, None) == url
    assert (with_credentials(url, "agent", "s").username,
            with_credentials(url, "agent", "s").password) == ("agent", "s")
    assert with_credentials(url, None, "s2").password == "s2"
    assert with_credentials(url, "other", None).password is None  # not u's password
    assert "s2" not in repr(with_credentials(url, None, "s2"))
    with pytest.raises(MqttConfigError, match="no user"):
        with_credentials(parse_broker_url("mqtt://h"), None, "pw")
    with pytest.raises(MqttConfigError, match="empty"):
        with_credentials(url, "", "pw")


def test_the_acl_grants_what_the_contract_says():
    acl = broker_acl().splitlines()
    assert "pattern write edgegen/v1/+/chat" in acl
    assert "pattern read edgegen/v1/reply/%c" in acl          # exact: not .../%c/#
    assert "pattern deny edgegen/v1/reply/chat" in acl
    agent = acl[acl.index("user edgegen-agent") + 1:]
    assert agent == ["topic read edgegen/v1/+/chat", "topic write edgegen/v1/reply/#"]
    assert not any(line.startswith("topic") for line in acl[:acl.index("user edgegen-agent")])


def test_node_names_that_make_no_topic_of_their_own():
    assert valid_node_name("edge-1") and valid_node_name("any")
    for bad in ("", "reply", "a/b", "a+", "#"):
        assert not valid_node_name(bad)


def test_reply_bytes_echo_the_correlation_only_for_body_routes():
    msg = {"object": "chat.completion"}
    assert json.loads(reply_bytes(msg, ReplyRoute("t", "c1", in_body=True))) == {
        **msg, "correlation_id": "c1"}
    assert json.loads(reply_bytes(msg, ReplyRoute("t", b"c1"))) == msg


def chunk(content=None, finish=None, role=None, usage=None, choices=True):
    delta = {}
    if role:
        delta["role"] = role
    if content is not None:
        delta["content"] = content
    out = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m",
           "choices": [{"index": 0, "delta": delta, "finish_reason": finish}] if choices else []}
    if usage is not None:
        out["usage"] = usage
    return out


def test_merge_concatenates_content_and_keeps_role_and_finish():
    m = merge_chunks([chunk("", role="assistant"), chunk("Hel"), chunk("lo"),
                      chunk(finish="stop"), chunk(choices=False, usage={"total_tokens": 5})])
    assert m["choices"] == [{"index": 0, "delta": {"role": "assistant", "content": "Hello"},
                             "finish_reason": "stop"}]
    assert m["usage"] == {"total_tokens": 5} and m["id"] == "c"


def test_merge_folds_tool_call_pieces_per_call():
    def calls(*pieces):
        out = chunk()
        out["choices"][0]["delta"]["tool_calls"] = list(pieces)
        return out
    start = {"index": 0, "id": "call_1", "type": "function",
             "function": {"name": "f", "arguments": ""}}
    m = merge_chunks([calls(start), calls({"index": 0, "function": {"arguments": '{"a": '}}),
                      calls({"index": 0, "function": {"arguments": "1}"}},
                            {"index": 1, "id": "call_2", "type": "function",
                             "function": {"name": "g", "arguments": "{}"}}),
                      chunk(finish="tool_calls")])
    assert m["choices"][0]["delta"]["tool_calls"] == [
        {**start, "function": {"name": "f", "arguments": '{"a": 1}'}},
        {"index": 1, "id": "call_2", "type": "function", "function": {"name": "g",
                                                                      "arguments": "{}"}}]
    assert m["choices"][0]["finish_reason"] == "tool_calls"
    assert start["function"]["arguments"] == ""          # the chunks are not changed


def test_coalescer_sends_the_first_text_at_once_then_by_token_count():
    c = ChunkCoalescer(max_tokens=3, max_delay=10)
    assert c.add(chunk("", role="assistant"), now=0.0) is None    # no text yet: wait
    out = [c.add(chunk(t), now=0.0) for t in "abcdefgh"]
    sent = [m["choices"][0]["delta"]["content"] for m in out if m]
    assert sent == ["a", "bcd", "efg"]
    assert out[0]["choices"][0]["delta"]["role"] == "assistant"
    final = c.finish()
    assert final["choices"][0]["delta"]["content"] == "h" and is_final(final)


def test_coalescer_flushes_by_age_of_the_oldest_chunk():
    c = ChunkCoalescer(max_tokens=100, max_delay=0.05)
    assert c.add(chunk("first"), now=0.0) is not None
    assert c.add(chunk("a"), now=1.0) is None
    assert c.deadline() == pytest.approx(1.05)
    assert not c.due(1.04) and c.due(1.05)
    m = c.add(chunk("b"), now=1.06)
    assert m["choices"][0]["delta"]["content"] == "ab" and c.deadline() is None


def test_coalescer_holds_everything_from_finish_reason_to_one_final_message():
    c = ChunkCoalescer(max_tokens=1, max_delay=0)
    assert c.add(chunk("a"), 0.0) is not None
    assert c.add(chunk("a2"), 0.0) is not None
    assert c.add(chunk("b", finish="stop"), 0.0) is None
    assert c.deadline() is None
    assert c.add(chunk(choices=False, usage={"completion_tokens": 2}), 5.0) is None
    final = c.finish()
    assert final["choices"][0]["finish_reason"] == "stop"
    assert final["usage"] == {"completion_tokens": 2}
    assert is_final(final) and not is_final(chunk("x"))


def test_coalescer_final_without_pending_chunks_still_carries_usage():
    c = ChunkCoalescer(max_tokens=1, max_delay=0)
    c.add(chunk("a"), 0.0)
    final = c.finish()
    assert final == {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m",
                     "choices": [], "usage": {}}
    assert ChunkCoalescer(1, 0).finish() is None


def test_first_seen_is_bounded():
    seen = FirstSeen(capacity=2)
    assert seen.first("a") and not seen.first("a")
    assert seen.first("b") and seen.first("c")      # "a" forgotten
    assert seen.first("a")
