"""A real Prometheus server (Debian's `prometheus`) scrapes a real agent and router: the
exposition parses, the DESIGN.md metric names arrive with their labels, and counters move."""

from __future__ import annotations

import shutil
import subprocess
import time

import httpx
import pytest

from manifests.consul_kv import Agent
from manifests.fleet_metrics import PrometheusMetrics, ScrapeMetrics
from tests.e2e.agent_support import start_agent
from tests.support.procs import EdgegenProcess, free_port, wait_http

pytestmark = pytest.mark.timeout(300)
PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"


def query(prom: str, expr: str) -> list[dict]:
    r = httpx.get(f"{prom}/api/v1/query", params={"query": expr}, timeout=10)
    r.raise_for_status()
    return r.json()["data"]["result"]


def wait_for(prom: str, expr: str, timeout: float = 60.0) -> list[dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = query(prom, expr)
        if result:
            return result
        time.sleep(0.5)
    raise AssertionError(f"Prometheus never had {expr!r}")


def test_prometheus_scrapes_agent_and_router(tiny_genai_bundle, tmp_path):
    reg_port, router_port, prom_port = free_port(), free_port(), free_port()
    consul = f"http://127.0.0.1:{reg_port}"
    procs = [EdgegenProcess(["registry", "--port", str(reg_port)], tmp_path, "registry")]
    prom = None
    try:
        wait_http(f"{consul}/v1/status/leader", proc=procs[0].proc)
        agent = start_agent(tiny_genai_bundle.path, tmp_path, "edge-a", "--region", "eu",
                            "--consul", consul)
        procs.append(agent.proc)
        procs.append(EdgegenProcess(["router", "--consul", consul, "--port", str(router_port)],
                                    tmp_path, "router"))
        router = f"http://127.0.0.1:{router_port}"
        wait_http(f"{router}/healthz", proc=procs[-1].proc)

        config = tmp_path / "prometheus.yml"
        config.write_text(
            "global: {scrape_interval: 1s, scrape_timeout: 1s}\n"
            "scrape_configs:\n"
            f"- job_name: agent\n  static_configs: [{{targets: ['127.0.0.1:{agent.port}']}}]\n"
            f"- job_name: router\n  static_configs: [{{targets: ['127.0.0.1:{router_port}']}}]\n"
        )
        log = open(tmp_path / "prometheus.log", "wb")
        prom = subprocess.Popen(
            [PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{prom_port}"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        prom_url = f"http://127.0.0.1:{prom_port}"
        wait_http(f"{prom_url}/-/ready", timeout=90, proc=prom)

        # Both targets are up: their exposition parsed in the real server.
        up = {r["metric"]["job"]: r["value"][1] for r in wait_for(prom_url, "up == 1")}
        deadline = time.monotonic() + 30
        while set(up) != {"agent", "router"} and time.monotonic() < deadline:
            time.sleep(0.5)
            up = {r["metric"]["job"]: r["value"][1] for r in query(prom_url, "up == 1")}
        assert set(up) == {"agent", "router"}, up

        [info] = wait_for(prom_url, "edgegen_bundle_info")
        assert info["metric"]["digest"] == tiny_genai_bundle.digest12
        assert info["metric"]["name"] == tiny_genai_bundle.name

        # Traffic through the router shows up on both sides' counters.
        wait_for(prom_url, 'edgegen_router_endpoints{tier="edge"} > 0')
        for _ in range(3):
            r = httpx.post(f"{router}/v1/chat/completions", timeout=60, json={
                "model": tiny_genai_bundle.name, "max_tokens": 4,
                "messages": [{"role": "user", "content": "hello"}]})
            assert r.status_code == 200, r.text
        served = wait_for(prom_url, 'edgegen_requests_total{endpoint="/v1/chat/completions"} >= 3')
        assert served[0]["metric"]["status"] == "200"
        routed = wait_for(prom_url, "sum(edgegen_router_requests_total) >= 3")
        assert float(routed[0]["value"][1]) >= 3
        wait_for(prom_url, "edgegen_generated_tokens_total > 0")

        # A rollout's health gates read the same counters from Prometheus (--prometheus) as
        # from the agent's own page: the series are found by the instance it registered as.
        row = Agent("edge-a", "eu", f"http://127.0.0.1:{agent.port}", "", True)
        direct = ScrapeMetrics().snapshot(row)
        via = None
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            via = PrometheusMetrics(prom_url).snapshot(row)
            if via is not None and (via.requests, via.ttft_count) == \
                    (direct.requests, direct.ttft_count):
                break
            time.sleep(0.5)
        assert via is not None and via.requests == direct.requests >= 3
        assert (via.failed, via.ttft_count, via.ttft_buckets, via.generated_tokens) == \
            (direct.failed, direct.ttft_count, direct.ttft_buckets, direct.generated_tokens)
        gone = Agent("edge-b", "eu", "http://127.0.0.1:9", "", True)
        assert PrometheusMetrics(prom_url).snapshot(gone) is None   # never scraped: no figures
        assert PrometheusMetrics(f"http://127.0.0.1:{free_port()}").snapshot(row) is None
    finally:
        if prom is not None:
            prom.terminate()
            prom.wait(30)
        for p in reversed(procs):
            p.stop()
