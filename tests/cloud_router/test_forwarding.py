"""Forwarding: the forwarder's outcomes over a mock transport, then the router (uvicorn) over
real sockets in front of small FastAPI upstreams."""

import asyncio
import json
import random
import time

import httpx

from cloud_router.endpoints import Endpoint
from cloud_router.forwarding import ForwardConfig, Forwarded, Forwarder, Refused
from cloud_router.metrics import RouterMetrics
from cloud_router.policy import RequestHints
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


def mock_edge(node: str) -> Endpoint:
    return Endpoint(id=f"edgegen-edge-{node}-8000", service="edgegen-edge", node=node,
                    address=f"{node}.test", port=8000, model="tiny")


def forward_with(handler, endpoints, consume=None):
    """Runs one ``forward`` over ``httpx.MockTransport(handler)``: (outcome, metrics, what
    ``consume(outcome)`` returned)."""
    async def scenario():
        table = EndpointTable([EndpointList(endpoints)], rng=random.Random(0))
        metrics = RouterMetrics(table.rows)
        forwarder = Forwarder(table, metrics, ForwardConfig(),
                              transport=httpx.MockTransport(handler))
        try:
            outcome = await forwarder.forward(
                "/v1/chat/completions", b'{"model": "tiny"}',
                {"content-type": "application/json", "authorization": "Bearer sk"},
                RequestHints(model="tiny"))
            return outcome, metrics, consume and await consume(outcome)
        finally:
            await forwarder.aclose()

    return asyncio.run(scenario())


def reply(status: int, body: bytes, headers: dict | None = None) -> httpx.Response:
    """An upstream answer still to be read, as the real transport gives it."""
    return httpx.Response(status, headers=headers, stream=httpx.ByteStream(body))


def count(metrics: RouterMetrics, tier: str, outcome: str) -> float:
    return metrics.registry.get_sample_value(
        "edgegen_router_requests_total", {"tier": tier, "outcome": outcome}) or 0.0


def test_the_forwarder_returns_outcomes_not_http_responses():
    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.url.host == "a.test":
            return reply(503, b'{"error": "busy"}')
        return reply(200, b'{"ok": true}', {"x-upstream": "1"})

    outcome, metrics, _ = forward_with(handler, [mock_edge("a"), mock_edge("b")])
    assert isinstance(outcome, Forwarded) and outcome.stream is None
    assert (outcome.endpoint.node, outcome.status) == ("b", 200)
    assert json.loads(outcome.body) == {"ok": True} and outcome.headers["x-upstream"] == "1"
    assert outcome.route == "nearest:ewma=unmeasured"
    assert "authorization" not in seen[0].headers   # only the listed headers go upstream
    assert count(metrics, "edge", "ok") == 1

    outcome, metrics, _ = forward_with(handler, [])
    assert outcome == Refused("no healthy endpoint serves model 'tiny' right now", 2)
    assert count(metrics, "none", "no_endpoint") == 1

    def down(request):
        raise httpx.ConnectError("refused", request=request)

    outcome, metrics, _ = forward_with(down, [mock_edge("a"), mock_edge("b")])
    assert isinstance(outcome, Refused) and outcome.retry_after_s == 2
    assert outcome.message.startswith("every endpoint tried failed; last: ")
    assert count(metrics, "edge", "upstream_error") == 1


def test_the_last_upstream_error_is_forwarded_when_every_try_fails():
    def handler(request):
        return reply(500, request.url.host.encode())

    outcome, metrics, _ = forward_with(handler, [mock_edge("a"), mock_edge("b")])
    assert isinstance(outcome, Forwarded) and outcome.status == 500
    assert outcome.body == outcome.endpoint.address.encode()
    assert count(metrics, "edge", "upstream_error") == 1


def test_a_forwarded_stream_yields_whole_events_and_counts_when_closed():
    def handler(request):
        return reply(200, b"data: 1\n\ndata: 2\n\ndata: [DONE]\n\n",
                     {"content-type": "text/event-stream"})

    async def consume(outcome):
        events = [e async for e in outcome.stream.events()]
        await outcome.stream.close(delivered=True)
        return events

    outcome, metrics, events = forward_with(handler, [mock_edge("a")], consume)
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


def test_connect_errors_are_retried_and_repeated_failures_eject(fleet, upstreams):
    dead = dead_endpoint()
    fleet[:] = [dead, upstreams["us"].endpoint]
    router = start_router(fleet)
    try:
        for _ in range(3):
            r = post(router)
            assert r.status_code == 200 and r.headers["x-edgegen-node"] == "us-1"
        rows = {row["node"]: row for row in
                httpx.get(router.url + "/edgegen/v1/endpoints").json()["endpoints"]}
        assert rows["dead"]["state"] == "ejected" and rows["dead"]["ejections"] == 1
        assert rows["dead"]["consecutive_failures"] == 3
        explain = httpx.get(router.url + "/edgegen/v1/route",
                            params={"model": "tiny", "region": "eu-west"}).json()
        assert explain["endpoint"]["node"] == "us-1" and explain["skipped"] == {dead.id: "ejected"}
        hits = upstreams["us"].hits
        post(router)  # ejected: not even tried, so no retry is spent
        assert upstreams["us"].hits == hits + 1
        assert metric(router, "edgegen_router_retries_total") == 3
    finally:
        router.stop()


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


def test_a_stream_broken_after_the_first_byte_ends_with_an_openai_error_event(router, upstreams):
    upstreams["eu"].mode = upstreams["eu2"].mode = "break"
    body = {**CHAT, "stream": True, "max_tokens": 6}
    with httpx.stream("POST", router.url + "/v1/chat/completions", json=body, headers=EU,
                      timeout=30) as r:
        assert r.status_code == 200
        events = [line for line in r.iter_lines() if line]
    assert len(events) == 3 and "[DONE]" not in events[-1]
    err = json.loads(events[-1][len("data: "):])["error"]
    assert err["type"] == "server_error" and err["code"] == "upstream_stream_broken"
    assert "broke" in err["message"]
    assert metric(router, 'edgegen_router_requests_total{outcome="stream_broken"') == 1


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
