"""Forwarding: the forwarder's outcomes against small aiohttp upstreams, then the router
(served as `edgegen router` serves it) over real sockets in front of small FastAPI upstreams."""

import asyncio
import json
import random
import time

import httpx
import pytest
from aiohttp import web

from cloud_router.endpoints import Endpoint
from cloud_router.forwarding import ForwardConfig, Forwarded, Forwarder, Refused
from cloud_router.metrics import RouterMetrics
from cloud_router.policy import PolicyConfig, RequestHints
from cloud_router.stats import RetryBudget
from cloud_router.table import EndpointTable
from tests.cloud_router.router_support import (  # noqa: F401 (fixtures)
    EndpointList, fleet, router, start_router, upstreams)
from tests.support.procs import free_port

CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}
EU = {"x-edgegen-region": "eu-west"}


def post(router, body=CHAT, headers=EU, **kw):
    return httpx.post(router.url + "/v1/chat/completions", json=body, headers=headers,
                      timeout=30, **kw)


def dead_endpoint(region="eu-west", node="dead") -> Endpoint:
    port = free_port()
    return Endpoint(id=f"edgegen-edge-{node}-{port}", service="edgegen-edge", node=node,
                    address="127.0.0.1", port=port, tier="edge", model="tiny", region=region)


def metric(router, name: str) -> float:
    text = httpx.get(router.url + "/metrics").text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name))


def forward_with(answers: dict, consume=None):
    """Runs one ``forward`` against a real upstream per entry of ``answers``, node -> its
    answer to every request, ``(status, body, headers)``, or None for a port that refuses
    connections: (outcome, metrics, what ``consume(outcome)`` returned, the requests seen)."""
    seen: list = []

    async def scenario():
        runners, endpoints = [], []
        for node, answer in answers.items():
            port = free_port()
            if answer is not None:
                async def handle(request, answer=answer):
                    seen.append(request)
                    status, body, headers = answer
                    return web.Response(status=status, body=body, headers=headers)

                app = web.Application()
                app.router.add_post("/v1/chat/completions", handle)
                runner = web.AppRunner(app)
                await runner.setup()
                await web.TCPSite(runner, "127.0.0.1", port).start()
                runners.append(runner)
            endpoints.append(Endpoint(id=f"edgegen-edge-{node}-{port}", service="edgegen-edge",
                                      node=node, address="127.0.0.1", port=port, model="tiny"))
        table = EndpointTable([EndpointList(endpoints)], rng=random.Random(0))
        metrics = RouterMetrics(table.rows)
        forwarder = Forwarder(table, metrics, ForwardConfig())
        try:
            outcome = await forwarder.forward(
                "/v1/chat/completions", b'{"model": "tiny"}',
                {"content-type": "application/json", "authorization": "Bearer sk"},
                RequestHints(model="tiny"))
            return outcome, metrics, consume and await consume(outcome), seen
        finally:
            await forwarder.aclose()
            for runner in runners:
                await runner.cleanup()

    return asyncio.run(scenario())


def count(metrics: RouterMetrics, tier: str, outcome: str) -> float:
    return metrics.registry.get_sample_value(
        "edgegen_router_requests_total", {"tier": tier, "outcome": outcome}) or 0.0


def test_the_forwarder_returns_outcomes_not_http_responses():
    busy = (503, b'{"error": "busy"}', {})
    fine = (200, b'{"ok": true}', {"x-upstream": "1", "content-type": "application/json"})
    outcome, metrics, _, seen = forward_with({"a": busy, "b": fine})
    assert isinstance(outcome, Forwarded) and outcome.stream is None
    assert (outcome.endpoint.node, outcome.status) == ("b", 200)
    assert json.loads(outcome.body) == {"ok": True} and outcome.headers["x-upstream"] == "1"
    assert outcome.route == "nearest:ewma=unmeasured"
    assert "authorization" not in seen[0].headers   # only the listed headers go upstream
    assert count(metrics, "edge", "ok") == 1

    outcome, metrics, _, _ = forward_with({})
    assert outcome == Refused("no healthy endpoint serves model 'tiny' right now", 2)
    assert count(metrics, "none", "no_endpoint") == 1

    outcome, metrics, _, _ = forward_with({"a": None, "b": None})
    assert isinstance(outcome, Refused) and outcome.retry_after_s == 2
    assert outcome.message.startswith("every endpoint tried failed; last: ")
    assert count(metrics, "edge", "upstream_error") == 1


def test_the_last_upstream_error_is_forwarded_when_every_try_fails():
    outcome, metrics, _, _ = forward_with({"a": (500, b"a", {}), "b": (500, b"b", {})})
    assert isinstance(outcome, Forwarded) and outcome.status == 500
    assert outcome.body == outcome.endpoint.node.encode()
    assert count(metrics, "edge", "upstream_error") == 1


def test_a_forwarded_stream_yields_whole_events_and_counts_when_closed():
    sse = (200, b"data: 1\n\ndata: 2\n\ndata: [DONE]\n\n", {"content-type": "text/event-stream"})

    async def consume(outcome):
        events = [e async for e in outcome.stream.events()]
        await outcome.stream.close(delivered=True)
        return events

    outcome, metrics, events, _ = forward_with({"a": sse}, consume)
    assert outcome.status == 200 and outcome.body == b""
    assert b"".join(events) == b"data: 1\n\ndata: 2\n\ndata: [DONE]\n\n"
    assert count(metrics, "edge", "ok") == 1


def test_nearest_region_serves_and_headers_say_why(router, upstreams):
    for _ in range(6):
        r = post(router)
        assert r.status_code == 200, r.text
        assert r.headers["x-edgegen-node"] in {"eu-1", "eu-2"}
        assert r.headers["x-edgegen-tier"] == "edge"
        assert r.headers["x-edgegen-route"] == "nearest:region=eu-west"
        assert r.json()["node"] == r.headers["x-edgegen-node"]
    r = post(router, headers={"x-edgegen-region": "us-east"})
    assert r.headers["x-edgegen-node"] == "us-1"
    assert upstreams["central"].hits == 0


def test_5xx_and_429_are_retried_on_another_endpoint(router, upstreams):
    upstreams["eu"].mode = "500"
    upstreams["eu2"].mode = "429"
    r = post(router)
    assert r.status_code == 200, r.text
    assert r.headers["x-edgegen-node"] == "us-1"  # next nearest after both eu endpoints
    assert upstreams["eu"].hits == 1 and upstreams["eu2"].hits == 1
    assert metric(router, "edgegen_router_retries_total") == 2


def test_a_refused_connection_is_retried_and_ejects_at_once(fleet, upstreams):
    dead = dead_endpoint()
    fleet[:] = [dead, upstreams["us"].endpoint]
    router = start_router(fleet)
    try:
        for _ in range(3):
            r = post(router)
            assert r.status_code == 200 and r.headers["x-edgegen-node"] == "us-1"
        rows = {row["node"]: row for row in
                httpx.get(router.url + "/edgegen/v1/endpoints").json()["endpoints"]}
        # one refused connection was enough: the two requests after it never tried it
        assert rows["dead"]["state"] == "ejected" and rows["dead"]["ejections"] == 1
        assert rows["dead"]["consecutive_failures"] == 1 and rows["dead"]["requests"] == 1
        explain = httpx.get(router.url + "/edgegen/v1/route",
                            params={"model": "tiny", "region": "eu-west"}).json()
        assert explain["endpoint"]["node"] == "us-1" and explain["skipped"] == {dead.id: "ejected"}
        assert metric(router, "edgegen_router_retries_total") == 1
    finally:
        router.stop()


def test_an_answer_that_is_not_json_is_no_success_and_is_retried(router, upstreams):
    upstreams["eu"].mode, upstreams["eu2"].mode = "garbage", "cut"
    r = post(router)
    assert r.status_code == 200 and r.headers["x-edgegen-node"] == "us-1"
    assert r.json()["node"] == "us-1"
    assert metric(router, "edgegen_router_upstream_invalid_answers_total") == 2
    upstreams["us"].mode = upstreams["central"].mode = "garbage"
    r = post(router)   # nothing but garbage: the client gets the router's 503, not garbage
    assert r.status_code == 503 and "not a JSON object" in r.json()["error"]["message"]


def test_when_every_attempt_fails_the_upstream_answer_is_passed_on(router, upstreams):
    for u in upstreams.values():
        u.mode = "500"
    r = post(router)
    assert r.status_code == 500 and r.json()["error"]["message"] == "boom"
    assert sum(u.hits for u in upstreams.values()) == 3  # max_attempts, each on a new endpoint


def test_retry_budget_stops_retries_from_multiplying_load(router, upstreams):
    router.app.state.table.budget = RetryBudget(ratio=0.0, min_retries=1, window_s=60)
    for u in upstreams.values():
        u.mode = "500"
    for _ in range(5):
        assert post(router).status_code == 500
    # 5 requests, 1 retry allowed in the window: 6 upstream attempts, not 15
    assert sum(u.hits for u in upstreams.values()) == 6


def test_fallback_to_central_then_503_with_retry_after(fleet, upstreams):
    fleet[:] = [upstreams["central"].endpoint]
    router = start_router(fleet)
    try:
        r = post(router)
        assert r.status_code == 200
        assert r.headers["x-edgegen-tier"] == "central"
        assert r.headers["x-edgegen-route"] == "fallback:central:no-edge"
        assert metric(router, "edgegen_router_fallbacks_total") == 1
        router.source.set([dead_endpoint(), dead_endpoint(node="dead2")])
        r = post(router)
        assert r.status_code == 503 and r.headers["retry-after"] == "2"
        assert r.json()["error"]["code"] == "no_endpoint"
        assert "every endpoint tried failed" in r.json()["error"]["message"]
        router.source.set([])
        r = post(router)  # nothing serves the model any more: unavailable, not unknown
        assert r.status_code == 503 and r.headers["retry-after"] == "2"
        assert "no healthy endpoint serves model 'tiny'" in r.json()["error"]["message"]
        assert post(router, body={**CHAT, "model": "never"}).status_code == 404
    finally:
        router.stop()


def test_sse_passes_through_event_by_event(router, upstreams):
    body = {**CHAT, "stream": True, "max_tokens": 4, "delay": 0.4, "user": "sse-1"}
    with httpx.stream("POST", router.url + "/v1/chat/completions", json=body, headers=EU,
                      timeout=30) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        node = r.headers["x-edgegen-node"]
        lines = r.iter_lines()
        first = next(line for line in lines if line)
        # the first event reached us while the upstream was still generating the rest
        upstream = upstreams["eu"] if node == "eu-1" else upstreams["eu2"]
        assert upstream.streams["sse-1"] == "started"
        rest = [line for line in lines if line]
    assert json.loads(first[6:])["choices"][0]["delta"]["content"] == "t0 "
    assert rest[-1] == "data: [DONE]" and len(rest) == 5
    assert upstream.streams["sse-1"] == "completed"


def stream_events(router, body, headers=EU) -> tuple[list[str], dict]:
    with httpx.stream("POST", router.url + "/v1/chat/completions", json=body, headers=headers,
                      timeout=30) as r:
        assert r.status_code == 200
        return [line for line in r.iter_lines() if line], dict(r.headers)


def chunks_of(events: list[str]) -> list[dict]:
    return [json.loads(e[len("data: "):]) for e in events if e != "data: [DONE]"]


def test_a_stream_that_breaks_where_nothing_can_continue_it_ends_with_an_error_event(
        router, upstreams):
    for u in upstreams.values():
        u.mode = "break"
    events, _ = stream_events(router, {**CHAT, "stream": True, "max_tokens": 6})
    assert len(events) == 3 and "[DONE]" not in events[-1]
    err = json.loads(events[-1][len("data: "):])["error"]
    assert err["type"] == "server_error" and err["code"] == "upstream_stream_broken"
    assert "broke" in err["message"]
    assert metric(router, 'edgegen_router_requests_total{outcome="stream_broken"') == 1
    # two continuations were tried (the migration limit), each broke before its first byte
    assert sum(len(u.resumed) for u in upstreams.values()) == 2


def test_a_stream_cut_by_its_edge_goes_on_elsewhere_as_one_stream(router, upstreams):
    upstreams["eu"].mode = upstreams["eu2"].mode = "break"
    body = {**CHAT, "stream": True, "max_tokens": 6, "user": "cut",
            "stream_options": {"include_usage": True}}
    events, headers = stream_events(router, body)
    chunks = chunks_of(events)
    # every word once, in order; one id and one creation time; no error; one role at most
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks
                   if c["choices"]) == "t0 t1 t2 t3 t4 t5 "
    assert {c["id"] for c in chunks} == {"cut"} and len({c["created"] for c in chunks}) == 1
    assert events[-1] == "data: [DONE]" and not any("error" in c for c in chunks)
    assert chunks[-1]["usage"]["completion_tokens"] == 6   # the whole generation's
    # the first continuation (the other eu edge) broke too; us-1 finished it
    assert upstreams["eu2"].resumed == ["t0 t1 "] or upstreams["eu"].resumed == ["t0 t1 "]
    assert upstreams["us"].resumed == ["t0 t1 "]
    assert metric(router, "edgegen_router_streams_resumed_total") == 2
    assert metric(router, 'edgegen_router_requests_total{outcome="stream_broken"') == 0
    assert metric(router, 'edgegen_router_requests_total{outcome="ok"') == 1
    # where it started was ejected by its one broken stream, at once (the other eu edge
    # stays: a third edge out would leave the tier less than half)
    rows = {row["node"]: row for row in
            httpx.get(router.url + "/edgegen/v1/endpoints").json()["endpoints"]}
    first = headers["x-edgegen-node"]
    assert first in {"eu-1", "eu-2"} and rows[first]["state"] == "ejected"
    assert rows[first]["consecutive_failures"] == 1


def test_a_greedy_stream_cut_by_its_edge_is_replayed_elsewhere_and_joined_exactly(
        router, upstreams):
    upstreams["eu"].mode = upstreams["eu2"].mode = "break"
    body = {**CHAT, "stream": True, "max_tokens": 6, "temperature": 0, "user": "greedy"}
    events, _ = stream_events(router, body)
    chunks = chunks_of(events)
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) \
        == "t0 t1 t2 t3 t4 t5 "
    assert {c["id"] for c in chunks} == {"greedy"} and events[-1] == "data: [DONE]"
    # replays, not continuations: each next edge was asked the request again
    assert not any(u.resumed for u in upstreams.values())
    assert upstreams["us"].streams["greedy"] == "completed"
    assert metric(router, "edgegen_router_streams_resumed_total") == 2


def test_a_replay_that_writes_other_text_ends_the_stream_with_an_error(router, upstreams):
    upstreams["eu"].mode = upstreams["eu2"].mode = "break"
    upstreams["us"].mode = "other"
    body = {**CHAT, "stream": True, "max_tokens": 6, "temperature": 0}
    events, _ = stream_events(router, body)
    text = "".join(c["choices"][0]["delta"].get("content") or ""
                   for c in chunks_of(events) if "choices" in c)
    assert text == "t0 t1 "   # nothing of the other text reached the client
    assert "could not be resumed exactly" in events[-1]
    assert metric(router, 'edgegen_router_requests_total{outcome="stream_broken"') == 1


@pytest.mark.parametrize("extra", [
    {"n": 2},
    {"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]},
    {"response_format": {"type": "json_object"}},
])
def test_streams_whose_state_cannot_move_are_not_resumed(router, upstreams, extra):
    upstreams["eu"].mode = upstreams["eu2"].mode = "break"
    events, _ = stream_events(router, {**CHAT, "stream": True, "max_tokens": 6, **extra})
    assert "upstream_stream_broken" in events[-1]
    assert not any(u.resumed for u in upstreams.values())


def test_client_disconnect_cancels_the_upstream_stream(router, upstreams):
    body = {**CHAT, "stream": True, "max_tokens": 200, "delay": 0.05, "user": "leaver"}
    with httpx.stream("POST", router.url + "/v1/chat/completions", json=body, headers=EU,
                      timeout=30) as r:
        node = r.headers["x-edgegen-node"]
        for line in r.iter_lines():
            if line:
                break
    upstream = upstreams["eu"] if node == "eu-1" else upstreams["eu2"]
    deadline = time.monotonic() + 20
    while upstream.streams.get("leaver") != "cancelled" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert upstream.streams["leaver"] == "cancelled"
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        rows = httpx.get(router.url + "/edgegen/v1/endpoints").json()["endpoints"]
        if all(row["inflight"] == 0 for row in rows):
            break
        time.sleep(0.05)
    assert all(row["inflight"] == 0 for row in rows)


def test_upstream_4xx_is_passed_through_without_retry(router, fleet, upstreams):
    router.source.set([*fleet, Endpoint(
        id="edgegen-edge-odd-1", service="edgegen-edge", node="odd", address="127.0.0.1",
        port=upstreams["us"].server.port, model="other", region="xx")])
    r = post(router, body={**CHAT, "model": "other"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert upstreams["us"].hits == 1


def test_the_router_learns_each_edges_queue_from_its_answers(fleet, upstreams):
    upstreams["eu"].report = "TEXT named_metrics.num_requests_waiting=3"
    upstreams["eu2"].report = "TEXT named_metrics.num_requests_waiting=0"
    # reports trusted for a minute: this test is about learning them, not about their age
    # (test_policy.py has the 1 s default on a table)
    router = start_router(fleet, policy=PolicyConfig(report_ttl_s=60.0))
    try:
        for _ in range(20):   # until both eu edges have answered once
            r = post(router)
            assert "endpoint-load-metrics" not in r.headers   # the router's, not the client's
            if upstreams["eu"].hits and upstreams["eu2"].hits:
                break
        rows = {row["node"]: row for row in
                httpx.get(router.url + "/edgegen/v1/endpoints").json()["endpoints"]}
        assert (rows["eu-1"]["queued"], rows["eu-2"]["queued"]) == (3, 0)
        for _ in range(5):   # three queued at eu-1: eu-2 takes every request now
            r = post(router)
            assert r.headers["x-edgegen-node"] == "eu-2"
            assert r.headers["x-edgegen-route"].startswith("placed:region=eu-west,queued=0")
    finally:
        router.stop()


def test_impossible_load_reports_are_counted_and_steer_nothing(router, upstreams):
    upstreams["eu"].report = "TEXT named_metrics.num_requests_waiting=-5"
    upstreams["eu2"].report = "TEXT named_metrics.kv_cache_usage_perc=7"
    for _ in range(6):
        assert post(router).status_code == 200
    assert metric(router, "edgegen_router_invalid_load_reports_total") >= 2
    rows = {row["node"]: row for row in
            httpx.get(router.url + "/edgegen/v1/endpoints").json()["endpoints"]}
    assert rows["eu-1"]["queued"] == 0 and rows["eu-2"]["cache_usage"] == 0.0


def test_a_conversation_goes_back_to_the_edge_that_holds_its_history(router, upstreams):
    system = {"role": "system", "content": "You answer questions about ships. " * 60}
    first = {**CHAT, "messages": [system, {"role": "user", "content": "What is a brig?"}]}
    r = post(router, body=first)
    holder = r.headers["x-edgegen-node"]
    second = {**first, "messages": [*first["messages"],
                                    {"role": "assistant", "content": "A two-masted ship."},
                                    {"role": "user", "content": "And a schooner?"}]}
    explain = httpx.post(router.url + "/edgegen/v1/route", json=second, headers=EU).json()
    rows = {row["node"]: row for row in explain["candidates"]}
    assert explain["endpoint"]["node"] == holder and explain["hints"]["prompt_prefixes"] == 4
    assert rows[holder]["cached_chars"] == sum(len(m["content"]) + len(m["role"]) + 1
                                               for m in first["messages"])
    assert explain["reason"].startswith("placed:region=eu-west,queued=0,cached=")
    for _ in range(4):   # every later turn, and every chat with the same system prompt
        assert post(router, body=second).headers["x-edgegen-node"] == holder
    other = {**CHAT, "messages": [system, {"role": "user", "content": "What is a ketch?"}]}
    assert post(router, body=other).headers["x-edgegen-node"] == holder
    assert httpx.post(router.url + "/edgegen/v1/route", content=b"{",
                      headers=EU).status_code == 400
