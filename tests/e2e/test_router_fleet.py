"""The whole path with real processes: the embedded registry, three edge agents behind WAN
proxies 5/40/120 ms away, one central agent, and the router, all found through the registry.

Tests run in order on one fleet (module scope) and take it down step by step: nearest edge,
the official `openai` client streaming, SIGKILL of the nearest edge under load, all edges gone
(central serves), everything gone (503 + Retry-After).
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from tests.cloud_router.registry_support import start_registry
from tests.support.procs import EdgegenProcess, free_port, wait_http
from tests.support.wan_proxy import WanProxy

# name, region, lat, lon, one-way delay (ms), the address the proxy listens on
EDGES = [("edge-near", "eu-west", 48.86, 2.35, 5, "127.0.0.2"),
         ("edge-mid", "eu-central", 50.11, 8.68, 40, "127.0.0.3"),
         ("edge-far", "us-east", 38.95, -77.45, 120, "127.0.0.4")]
PARIS_CLIENT = {"x-edgegen-region": "eu-west", "x-edgegen-location": "48.85,2.35"}


def agent_args(bundle, node, port, consul, tier="edge", region="", lat=None, lon=None,
               advertise="127.0.0.1"):
    args = ["agent", "--bundle", str(bundle.path), "--node", node, "--port", str(port),
            "--tier", tier, "--region", region, "--consul", consul,
            "--advertise-host", advertise, "--threads", "1", "--max-concurrency", "4"]
    if lat is not None:
        args += ["--lat", str(lat), "--lon", str(lon)]
    return args


class Fleet:
    def __init__(self, tmp, bundle):
        self.procs: dict[str, EdgegenProcess] = {}
        self.proxies: list[WanProxy] = []
        self.registry, self.consul = start_registry(tmp, min_deregister_after=0.0)
        for node, region, lat, lon, delay, addr in EDGES:
            port = free_port()
            self.proxies.append(WanProxy((addr, port), ("127.0.0.1", port), delay).start())
            self.procs[node] = EdgegenProcess(
                agent_args(bundle, node, port, self.consul, region=region, lat=lat, lon=lon,
                           advertise=addr), tmp, node)
        self.procs["central"] = EdgegenProcess(
            agent_args(bundle, "central-gpu", free_port(), self.consul, tier="central",
                       region="eu-central"), tmp, "central")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.router = EdgegenProcess(["router", "--consul", self.consul, "--port",
                                      str(self.port)], tmp, "router")

    def wait_endpoints(self, expect: set[str], timeout: float = 120.0) -> list[dict]:
        """Poll the router's table until it holds exactly the nodes in ``expect``."""
        deadline = time.monotonic() + timeout
        rows: list[dict] = []
        while time.monotonic() < deadline:
            try:
                rows = httpx.get(self.url + "/edgegen/v1/endpoints").json()["endpoints"]
            except httpx.HTTPError:
                rows = []
            if {r["node"] for r in rows} == expect:
                return rows
            time.sleep(0.2)
        raise TimeoutError(f"router table {[r['node'] for r in rows]} != {expect}:\n"
                           + self.logs())

    def logs(self) -> str:
        return "\n".join(f"--- {n}\n{p.log()[-1500:]}" for n, p in
                         {**self.procs, "router": self.router}.items())

    def stop(self):
        for p in [self.router, *self.procs.values(), self.registry]:
            p.stop()
        for proxy in self.proxies:
            proxy.stop()


@pytest.fixture(scope="module")
def fleet(tmp_path_factory, tiny_genai_bundle):
    f = Fleet(tmp_path_factory.mktemp("fleet"), tiny_genai_bundle)
    try:
        wait_http(f.url + "/healthz", timeout=60, proc=f.router.proc)
        f.wait_endpoints({"edge-near", "edge-mid", "edge-far", "central-gpu"}, timeout=180)
        f.model = httpx.get(f.url + "/v1/models").json()["data"][0]["id"]
        yield f
    finally:
        f.stop()


def chat(fleet, headers=PARIS_CLIENT, client=httpx, **kw):
    body = {"model": fleet.model, "messages": [{"role": "user", "content": "Hello"}],
            "max_tokens": 4, "temperature": 0, **kw}
    return client.post(fleet.url + "/v1/chat/completions", json=body, headers=headers,
                       timeout=60)


def test_region_hint_goes_to_the_nearest_edge(fleet):
    for _ in range(10):
        r = chat(fleet)
        assert r.status_code == 200, r.text
        assert r.headers["x-edgegen-node"] == "edge-near"
        assert r.headers["x-edgegen-route"] == "nearest:region=eu-west"
        assert r.json()["choices"][0]["message"]["role"] == "assistant"
    r = chat(fleet, headers={"x-edgegen-region": "us-east"})
    assert r.headers["x-edgegen-node"] == "edge-far"
    r = chat(fleet, headers={"x-edgegen-location": "50.0,8.0"})  # a client near Frankfurt
    assert r.headers["x-edgegen-node"] == "edge-mid"
    assert r.headers["x-edgegen-route"].startswith("nearest:location=")


def test_the_openai_client_streams_through_the_router(fleet):
    client = openai.OpenAI(base_url=fleet.url + "/v1", api_key="unused",
                           default_headers=PARIS_CLIENT, max_retries=0)
    stream = client.chat.completions.create(
        model=fleet.model, messages=[{"role": "user", "content": "Say hi"}], max_tokens=8,
        stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert len({c.id for c in chunks}) == 1
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("length", "stop")
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    raw = client.chat.completions.with_raw_response.create(
        model=fleet.model, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert raw.headers["x-edgegen-node"] == "edge-near"


def test_the_openai_client_retrieves_a_model_through_the_router(fleet):
    client = openai.OpenAI(base_url=fleet.url + "/v1", api_key="unused", max_retries=0)
    card = client.models.retrieve(fleet.model)
    assert (card.id, card.object, card.owned_by) == (fleet.model, "model", "edgegen")
    with pytest.raises(openai.NotFoundError) as exc:
        client.models.retrieve("org/no-such-model")
    assert exc.value.code == "model_not_found"


def test_sigkill_of_the_nearest_edge_loses_no_request(fleet):
    served: list[tuple[int, int, str]] = []
    with httpx.Client() as client, ThreadPoolExecutor(4) as pool:
        def one(i):
            r = chat(fleet, client=client)
            return i, r.status_code, r.headers.get("x-edgegen-node", r.text)

        futures = [pool.submit(one, i) for i in range(200)]
        while sum(f.done() for f in futures) < 50:
            time.sleep(0.01)
        fleet.procs["edge-near"].kill()
        served = [f.result() for f in futures]
    failed = [s for s in served if s[1] != 200]
    assert not failed, failed
    nodes = [node for _i, _s, node in served]
    assert "edge-near" in nodes[:50]
    assert set(nodes[-50:]) == {"edge-mid"}  # the next nearest to the client
    metrics = httpx.get(fleet.url + "/metrics").text
    retries = next(float(line.split()[-1]) for line in metrics.splitlines()
                   if line.startswith("edgegen_router_retries_total"))
    assert retries >= 1


def test_with_every_edge_killed_the_central_tier_serves(fleet):
    fleet.procs["edge-mid"].kill()
    fleet.procs["edge-far"].kill()
    # at once: the dead edges are still in the table, retries carry the request to central
    r = chat(fleet)
    assert r.status_code == 200, r.text
    assert r.headers["x-edgegen-tier"] == "central"
    fleet.wait_endpoints({"central-gpu"}, timeout=60)
    for _ in range(5):
        r = chat(fleet)
        assert r.status_code == 200
        assert r.headers["x-edgegen-node"] == "central-gpu"
        assert r.headers["x-edgegen-route"] == "fallback:central:no-edge"


def test_with_everything_killed_clients_get_503_with_retry_after(fleet):
    fleet.procs["central"].kill()
    r = chat(fleet)
    assert r.status_code == 503
    assert int(r.headers["retry-after"]) > 0
    err = r.json()["error"]
    assert err["type"] == "service_unavailable" and err["message"]
    fleet.wait_endpoints(set(), timeout=60)  # the registry dropped it too
    r = chat(fleet)
    assert r.status_code == 503 and int(r.headers["retry-after"]) > 0
    assert "no healthy endpoint" in r.json()["error"]["message"]
    assert httpx.get(fleet.url + "/readyz").status_code == 503
