"""The router's own HTTP surface over a real socket: errors, tables, explanations, metrics,
API keys, and the `edgegen router` command."""

import logging

import httpx
import openai
import pytest

from cloud_router.endpoints import Endpoint
from cloud_router.traefik import traefik_config
from tests.cloud_router.router_support import fleet, router, start_router, upstreams  # noqa: F401 (fixtures)

CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}


def test_client_mistakes_get_openai_shaped_4xx(router):
    url = router.url + "/v1/chat/completions"
    r = httpx.post(url, json={**CHAT, "model": "gpt-9"})
    assert r.status_code == 404
    err = r.json()["error"]
    assert err["code"] == "model_not_found" and err["param"] == "model"
    assert "gpt-9" in err["message"] and "tiny" in err["message"]  # lists the known ones
    r = httpx.post(url, content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = httpx.post(url, json={"messages": []})
    assert r.status_code == 400 and r.json()["error"]["param"] == "model"
    r = httpx.post(url, json=CHAT, headers={"x-edgegen-location": "north pole"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "x-edgegen-location"
    r = httpx.post(url, json=CHAT, headers={"x-edgegen-location": "91,0"})
    assert r.status_code == 400 and "latitude" in r.json()["error"]["message"]
    r = httpx.get(router.url + "/edgegen/v1/route")
    assert r.status_code == 400 and r.json()["error"]["param"] == "model"


def test_error_types_follow_the_status(fleet):
    r = start_router(fleet, api_keys=frozenset({"sk-1"}))
    try:
        url = r.url + "/v1/chat/completions"
        assert httpx.post(url, json=CHAT).json()["error"]["type"] == "authentication_error"
        auth = {"authorization": "Bearer sk-1"}
        err = httpx.post(url, json={**CHAT, "model": "gpt-9"}, headers=auth).json()["error"]
        assert err["type"] == "not_found_error"
        err = httpx.post(url, content=b"{", headers=auth).json()["error"]
        assert err["type"] == "invalid_request_error"
    finally:
        r.stop()


def test_unknown_routes_and_wrong_methods_answer_in_openai_shape(router):
    r = httpx.post(router.url + "/v1/nothing-here", json=CHAT)
    assert r.status_code == 404
    assert r.json() == {"error": {"message": "no route POST /v1/nothing-here",
                                  "type": "not_found_error", "param": None,
                                  "code": "unknown_route"}}
    r = httpx.get(router.url + "/v1/chat/completions")
    assert r.status_code == 405 and r.headers["allow"] == "POST"
    err = r.json()["error"]
    assert set(r.json()) == {"error"} and set(err) == {"message", "type", "param", "code"}
    assert err["type"] == "invalid_request_error" and err["message"] == "Method Not Allowed"
    r = httpx.delete(router.url + "/edgegen/v1/endpoints")
    assert r.status_code == 405 and "detail" not in r.json() and r.json()["error"]["message"]


def refused_counts(router) -> dict[str, float]:
    text = httpx.get(router.url + "/metrics").text
    prefix = 'edgegen_router_requests_total{outcome="'
    return {line[len(prefix):].split('"')[0]: float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith(prefix) and 'tier="none"' in line}


def test_requests_the_router_refuses_are_counted(fleet):
    r = start_router(fleet, api_keys=frozenset({"sk-1"}))
    try:
        url = r.url + "/v1/chat/completions"
        auth = {"authorization": "Bearer sk-1"}
        assert refused_counts(r) == {}
        assert httpx.post(url, json=CHAT).status_code == 401
        assert httpx.post(url, json=CHAT, headers={"authorization": "Bearer no"}) \
            .status_code == 401
        assert httpx.post(url, json={**CHAT, "model": "gpt-9"}, headers=auth).status_code == 404
        assert httpx.post(url, content=b"{", headers=auth).status_code == 400
        assert httpx.post(url, json={"messages": []}, headers=auth).status_code == 400
        assert httpx.post(url, json=CHAT, headers={**auth, "x-edgegen-location": "x"}) \
            .status_code == 400
        r.source.set([])
        assert httpx.post(url, json=CHAT, headers=auth).status_code == 503
        # the router's own pages are not API requests: not counted
        assert httpx.get(r.url + "/v1/models").status_code == 401
        assert httpx.get(r.url + "/edgegen/v1/route", params={"model": "x"},
                         headers=auth).status_code == 404
        assert refused_counts(r) == {"unauthorized": 2, "unknown_model": 1, "bad_request": 3,
                                     "no_endpoint": 1}
    finally:
        r.stop()


def test_models_is_the_union_of_healthy_endpoints(fleet, upstreams):
    other = Endpoint(id="edgegen-edge-x-1", service="edgegen-edge", node="x",
                     address="127.0.0.1", port=1, model="bigger")
    fleet.append(other)
    r = start_router(fleet)
    try:
        body = httpx.get(r.url + "/v1/models").json()
        assert body["object"] == "list"
        assert [m["id"] for m in body["data"]] == ["bigger", "tiny"]
    finally:
        r.stop()


def test_a_model_is_retrieved_as_its_models_entry(fleet, upstreams):
    fleet.append(Endpoint(id="edgegen-edge-x-1", service="edgegen-edge", node="x",
                          address="127.0.0.1", port=1, model="org/bigger"))
    r = start_router(fleet, api_keys=frozenset({"sk-1"}))
    try:
        auth = {"authorization": "Bearer sk-1"}
        listed = httpx.get(r.url + "/v1/models", headers=auth).json()["data"]
        for entry in listed:  # a slash in the id, as sent or as OpenAI's client encodes it
            for path in (entry["id"], entry["id"].replace("/", "%2F")):
                got = httpx.get(r.url + "/v1/models/" + path, headers=auth)
                assert got.status_code == 200 and got.json() == entry, path
        miss = httpx.get(r.url + "/v1/models/org/gpt-9", headers=auth)
        err = miss.json()["error"]
        assert miss.status_code == 404 and set(miss.json()) == {"error"}
        assert (err["type"], err["param"], err["code"]) == ("not_found_error", "model",
                                                           "model_not_found")
        assert "org/gpt-9" in err["message"] and "org/bigger" in err["message"]
        assert httpx.get(r.url + "/v1/models/tiny").status_code == 401
        client = openai.OpenAI(base_url=r.url + "/v1", api_key="sk-1", max_retries=0)
        card = client.models.retrieve("org/bigger")
        assert (card.id, card.object, card.owned_by) == ("org/bigger", "model", "edgegen")
        with pytest.raises(openai.NotFoundError):
            client.models.retrieve("gpt-9")
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=r.url + "/v1", api_key="no", max_retries=0) \
                .models.retrieve("tiny")
        # like /v1/models, a page of the router's own: not counted as an API request
        assert refused_counts(r) == {}
    finally:
        r.stop()


def test_endpoint_table_and_route_explanation(router, upstreams):
    httpx.post(router.url + "/v1/chat/completions", json=CHAT,
               headers={"x-edgegen-region": "us-east"})
    rows = httpx.get(router.url + "/edgegen/v1/endpoints").json()["endpoints"]
    assert [r["tier"] for r in rows] == ["edge", "edge", "edge", "central"]
    us = next(r for r in rows if r["node"] == "us-1")
    assert us["state"] == "healthy" and us["requests"] == 1 and us["ewma_ms"] > 0
    assert us["inflight"] == 0 and us["ejections"] == 0
    explain = httpx.get(router.url + "/edgegen/v1/route", params={
        "model": "tiny", "region": "eu-west", "location": "48.8,2.3"}).json()
    assert explain["endpoint"]["node"] in {"eu-1", "eu-2"}
    assert explain["reason"] == "nearest:region=eu-west"
    assert explain["hints"]["location"] == [48.8, 2.3]
    assert {c["node"] for c in explain["candidates"]} == {"eu-1", "eu-2", "us-1"}
    assert httpx.get(router.url + "/edgegen/v1/route",
                     params={"model": "nope"}).status_code == 404


def test_router_region_is_the_default_hint(fleet, upstreams):
    r = start_router(fleet, region="us-east")
    try:
        resp = httpx.post(r.url + "/v1/chat/completions", json=CHAT)
        assert resp.headers["x-edgegen-node"] == "us-1"
        resp = httpx.post(r.url + "/v1/chat/completions", json=CHAT,
                          headers={"x-edgegen-region": "eu-west"})
        assert resp.headers["x-edgegen-node"] in {"eu-1", "eu-2"}
    finally:
        r.stop()


def test_health_readiness_and_metrics(router, fleet):
    assert httpx.get(router.url + "/healthz").json() == {"status": "ok"}
    assert httpx.get(router.url + "/readyz").status_code == 200
    httpx.post(router.url + "/v1/chat/completions", json=CHAT)
    text = httpx.get(router.url + "/metrics").text
    for name in ('edgegen_router_requests_total{outcome="ok",tier="edge"} 1.0',
                 "edgegen_router_upstream_duration_seconds_bucket{endpoint=",
                 "edgegen_router_retries_total 0.0", "edgegen_router_fallbacks_total 0.0",
                 'edgegen_router_endpoints{state="healthy",tier="edge"} 3.0',
                 'edgegen_router_endpoints{state="healthy",tier="central"} 1.0'):
        assert name in text, name
    router.source.set([])
    r = httpx.get(router.url + "/readyz")
    assert r.status_code == 503 and r.json()["endpoints"] == 0


def test_api_keys(fleet, caplog):
    caplog.set_level(logging.DEBUG)
    r = start_router(fleet, api_keys=frozenset({"sk-edge-123"}))
    try:
        url = r.url + "/v1/chat/completions"
        for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": "sk-edge-123"}):
            resp = httpx.post(url, json=CHAT, headers=headers)
            assert resp.status_code == 401, headers
            assert resp.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(r.url + "/v1/models").status_code == 401
        assert httpx.get(r.url + "/edgegen/v1/endpoints").status_code == 401
        ok = httpx.post(url, json=CHAT, headers={"authorization": "Bearer sk-edge-123"})
        assert ok.status_code == 200
        assert httpx.get(r.url + "/healthz").status_code == 200
        assert httpx.get(r.url + "/metrics").status_code == 200
    finally:
        r.stop()
    assert "sk-edge-123" not in caplog.text


def test_traefik_config_for_a_fleet(fleet):
    cfg = traefik_config(fleet)["http"]
    services, routers = cfg["services"], cfg["routers"]
    assert [s["url"] for s in services["edgegen-edge-eu-west"]["loadBalancer"]["servers"]] \
        == [e.url for e in fleet if e.region == "eu-west"]
    assert services["edgegen-edge-eu-west"]["loadBalancer"]["healthCheck"]["path"] == "/readyz"
    assert {s["name"]: s["weight"] for s in services["edgegen-edge"]["weighted"]["services"]} \
        == {"edgegen-edge-eu-west": 2, "edgegen-edge-us-east": 1}
    assert services["edgegen-fleet"]["failover"] == {
        "service": "edgegen-edge", "fallback": "edgegen-central", "healthCheck": {}}
    assert routers["edgegen"]["service"] == "edgegen-fleet"
    assert routers["edgegen-region-us-east"]["rule"].endswith(
        "Header(`x-edgegen-region`, `us-east`)")
    assert cfg["middlewares"]["edgegen-retry"]["retry"]["attempts"] == 3
    for r in routers.values():
        assert r["service"] in services and r["middlewares"] == ["edgegen-retry"]




