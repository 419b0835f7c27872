"""benchmarks/python_floor.py, the router benchmark's reference points, still forwards, and
still makes the router's decisions with the router's code (an API change there would
otherwise break the benchmark unseen)."""

import subprocess
import sys

import httpx
import pytest

from tests.cloud_router.router_support import ServerThread, Upstream
from tests.support.procs import REPO, free_port, stop_process, wait_port

MODEL = "standin-model"


@pytest.fixture(scope="module")
def upstream():
    up = Upstream("standin", region="eu-west", model=MODEL)
    up.server = ServerThread(up.app())
    yield up
    up.server.stop()


@pytest.mark.parametrize("flags, route", [([], None),
                                          (["--router-logic"], "nearest:region=eu-west")])
def test_the_floor_proxy_forwards_and_with_the_routers_logic_says_its_route(
        upstream, flags, route):
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(REPO / "benchmarks" / "python_floor.py"),
                             "--port", str(port), "--upstream-port", str(upstream.server.port),
                             "--model", MODEL, *flags], stderr=subprocess.PIPE)
    try:
        wait_port(port, proc)
        upstream.hits = 0
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            for _ in range(2):   # one keep-alive connection each way: the pool is reused
                r = client.post("/v1/chat/completions", headers={"x-edgegen-region": "eu-west"},
                                json={"model": MODEL, "messages": [
                                    {"role": "user", "content": "Hello"}]})
                assert r.status_code == 200 and r.json()["node"] == "standin"
                assert r.headers.get("x-edgegen-route") == route
        assert upstream.hits == 2
    finally:
        stop_process(proc, 5)
