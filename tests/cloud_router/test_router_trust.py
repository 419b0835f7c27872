"""The router trusts only what it should, over real processes: an `edgegen registry` with
ACLs, `edgegen router` processes given their token and the fleet key through files and the
environment, and small HTTP agents on real sockets that prove the key with the agent's own
identity route. An impostor registered with a leaked write token and a copied Meta (and that
relays the nonce to a real agent) is never sent a prompt; a router without the key is fooled,
which is what the key is for. No token or key reaches a log or a command line.

(tests/e2e/test_impostor.py runs the same attack against real `edgegen agent` processes.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI, Request

from cloud_router.credentials import write_fleet_secrets
from edge_agent.rest import identity
from edge_agent.settings import AgentSettings
from tests.cloud_router.registry_support import start_registry
from tests.cloud_router.router_support import ServerThread
from tests.support.procs import REPO, EdgegenProcess, free_port, wait_http

PARIS = {"x-edgegen-region": "eu-west"}


class FakeAgent:
    """An HTTP agent: chat answers naming itself, /readyz, and the agent's identity route
    (``relay_to``: an impostor that asks that agent and passes its answer on)."""

    def __init__(self, node: str, key: bytes | None, relay_to: "FakeAgent | None" = None):
        self.node, self.hits = node, 0
        self.port = free_port()
        app = FastAPI()
        app.state.settings = AgentSettings(bundle="/none", node=node, port=self.port,
                                           fleet_key=key)

        @app.post("/v1/chat/completions")
        async def chat(request: Request) -> dict:
            self.hits += 1
            return {"id": "chatcmpl-1", "object": "chat.completion", "created": 0,
                    "model": "tiny", "choices": [{"index": 0, "finish_reason": "stop",
                                                  "message": {"role": "assistant",
                                                              "content": f"I am {node}"}}]}

        @app.get("/readyz")
        async def readyz() -> dict:
            return {"status": "ok"}

        if relay_to is None:
            app.include_router(identity.router)
        else:
            @app.get("/edgegen/v1/identity")
            async def relay(nonce: str = "") -> dict:
                async with httpx.AsyncClient() as client:
                    r = await client.get(f"{relay_to.url}/edgegen/v1/identity",
                                         params={"nonce": nonce})
                return r.json()

        self.server = ServerThread(app, self.port)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def registration(self, node: str | None = None, region: str = "eu-west") -> dict:
        node = node or self.node
        return {"Name": "edgegen-edge", "ID": f"edgegen-edge-{self.node}-{self.port}",
                "Address": "127.0.0.1", "Port": self.port,
                "Tags": ["model=tiny", "digest=abcdefabcdef"],
                "Meta": {"node": node, "region": region, "zone": "", "lat": "48.86",
                         "lon": "2.35", "model": "tiny", "digest": "abcdefabcdef",
                         "tier": "edge", "max_concurrency": "4", "mqtt": ""},
                "Check": {"HTTP": f"{self.url}/readyz", "Interval": "1s", "Timeout": "1s"}}


def register(consul: str, body: dict, token: str | None) -> httpx.Response:
    return httpx.put(f"{consul}/v1/agent/service/register", json=body,
                     headers={"X-Consul-Token": token} if token else {})


def cmdline(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("trust")
    secrets = write_fleet_secrets(tmp / "secrets")
    values = {f: secrets.directory.joinpath(f).read_text().strip()
              for f in os.listdir(secrets.directory) if f.endswith((".token", ".key"))}
    agent_token = values["consul-agent.token"]
    key = values["fleet.key"].encode()
    registry, consul = start_registry(tmp, acl_file=secrets.acl_file)
    near, far = FakeAgent("edge-near", key), FakeAgent("edge-far", key)
    impostor = FakeAgent("impostor", None, relay_to=near)
    routers = {}
    try:
        for agent, region in ((near, "eu-west"), (far, "us-east")):
            assert register(consul, agent.registration(region=region),
                            agent_token).status_code == 200
        # the secrets reach the router by file and environment only, never argv
        port = free_port()
        routers["trusting"] = (EdgegenProcess(
            ["--log-level", "info", "router", "--consul", consul, "--port", str(port),
             "--consul-token-file", str(secrets.token_file("router")),
             "--identity-recheck", "2"], tmp, "router-with-key",
            env={"EDGEGEN_FLEET_KEY_FILE": str(secrets.fleet_key_file)}),
            f"http://127.0.0.1:{port}")
        port = free_port()
        routers["naive"] = (EdgegenProcess(
            ["--log-level", "info", "router", "--consul", consul, "--port", str(port)],
            tmp, "router-without-key",
            env={"CONSUL_HTTP_TOKEN": values["consul-router.token"]}),
            f"http://127.0.0.1:{port}")
        for proc, url in routers.values():
            wait_http(url + "/healthz", timeout=60, proc=proc.proc)
        yield {"consul": consul, "secrets": secrets, "values": values, "near": near,
               "far": far, "impostor": impostor, "routers": routers, "registry": registry,
               "tmp": tmp}
    finally:
        for proc, _ in routers.values():
            proc.stop()
        for agent in (near, far, impostor):
            agent.server.stop()
        registry.stop()


def table(url: str) -> dict[str, dict]:
    return {r["node"] + ":" + r["id"].rsplit("-", 1)[1]: r
            for r in httpx.get(url + "/edgegen/v1/endpoints").json()["endpoints"]}


def wait_for(condition, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError("condition not met in time")


def chat(url: str) -> httpx.Response:
    return httpx.post(url + "/v1/chat/completions", headers=PARIS, timeout=30,
                      json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}]})


def test_without_a_token_the_impostor_cannot_even_register(world):
    r = register(world["consul"], world["impostor"].registration("edge-near"), None)
    assert r.status_code == 403 and r.text.startswith(
        "Permission denied: anonymous token lacks permission 'service:write' on "
        "\"edgegen-edge\"")
    r = register(world["consul"], world["impostor"].registration("edge-near"),
                 world["values"]["consul-router.token"])
    assert r.status_code == 403 and "lacks permission 'service:write'" in r.text


def test_an_impostor_with_a_leaked_write_token_gets_no_prompt(world):
    impostor, near = world["impostor"], world["near"]
    # registered with the agents' (leaked) token, Meta copied from the nearest edge
    r = register(world["consul"], impostor.registration("edge-near"),
                 world["values"]["consul-agent.token"])
    assert r.status_code == 200
    _, url = world["routers"]["trusting"]
    impostor_key = f"edge-near:{impostor.port}"
    rows = wait_for(lambda: (t := table(url)) and t.get(impostor_key, {}).get("identity")
                    == "failed" and t[f"edge-near:{near.port}"]["identity"] == "verified"
                    and t)
    assert "wrong MAC" in rows[impostor_key]["identity_reason"]   # the relay did not help
    assert rows[f"edge-far:{world['far'].port}"]["identity"] == "verified"
    impostor.hits = near.hits = 0
    for _ in range(20):
        r = chat(url)
        assert r.status_code == 200 and r.headers["x-edgegen-node"] == "edge-near", r.text
        assert r.json()["choices"][0]["message"]["content"] == "I am edge-near"
    assert impostor.hits == 0 and near.hits == 20
    explain = httpx.get(url + "/edgegen/v1/route",
                        params={"model": "tiny", "region": "eu-west"}).json()
    impostor_id = f"edgegen-edge-impostor-{impostor.port}"
    assert explain["endpoint"]["url"] == near.url
    assert explain["skipped"] == {impostor_id: "identity-failed"}
    assert impostor_id not in {c["endpoint_id"] for c in explain["candidates"]}
    metrics = httpx.get(url + "/metrics").text
    assert 'edgegen_router_endpoint_identity{state="failed",tier="edge"} 1.0' in metrics
    assert 'edgegen_router_endpoint_identity{state="verified",tier="edge"} 2.0' in metrics
    # re-checked on a schedule (--identity-recheck 2 for the verified, 5 s for the failed)
    def checks(outcome: str) -> float:
        for line in httpx.get(url + "/metrics").text.splitlines():
            if line.startswith(f'edgegen_router_identity_checks_total{{outcome="{outcome}"}}'):
                return float(line.split()[-1])
        return 0.0

    verified, rejected = checks("verified"), checks("rejected")
    wait_for(lambda: checks("verified") >= verified + 2 and checks("rejected") > rejected,
             timeout=20)
    assert table(url)[impostor_key]["identity"] == "failed"

    # the same fleet, read by a router without the key: the impostor gets prompts
    _, naive = world["routers"]["naive"]
    wait_for(lambda: impostor_key in table(naive))
    impostor.hits = 0
    for _ in range(20):
        assert chat(naive).status_code == 200
    assert impostor.hits > 0


def test_secrets_stay_out_of_logs_and_command_lines(world):
    secrets = list(world["values"].values())
    procs = [world["registry"], *(p for p, _ in world["routers"].values())]
    for proc in procs:
        line = cmdline(proc.pid)
        assert all(s not in line for s in secrets), line
        log = proc.log()
        assert log.strip()   # they did log
        assert all(s not in log for s in secrets), proc.name
    # the router said it has a token and a key, without saying what they are
    started = [json.loads(line) for line in world["routers"]["trusting"][0].log().splitlines()
               if '"router started"' in line]
    assert started and started[0]["consul_token"] is True and started[0]["fleet_key"] is True


def test_status_and_traefik_config_read_with_the_token(world):
    consul, secrets = world["consul"], world["secrets"]
    env = {**os.environ, "COLUMNS": "200",
           "CONSUL_HTTP_TOKEN_FILE": str(secrets.token_file("router"))}
    r = subprocess.run([sys.executable, "-m", "cli.main", "status", "--target", "local",
                        "--consul", consul], cwd=REPO, capture_output=True, text=True,
                       env=env, timeout=60)
    assert r.returncode == 0 and "edge-far" in r.stdout, r.stdout + r.stderr
    out = world["tmp"] / "traefik.yaml"
    r = subprocess.run([sys.executable, "-m", "cli.main", "router", "traefik-config",
                        "--consul", consul, "-o", str(out)], cwd=REPO, capture_output=True,
                       text=True, env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    assert world["far"].url in out.read_text()
    # an unknown token: Consul's refusal, said plainly, the token not repeated
    bad = {**os.environ, "CONSUL_HTTP_TOKEN": "not-a-token-the-registry-knows"}
    r = subprocess.run([sys.executable, "-m", "cli.main", "status", "--target", "local",
                        "--consul", consul], cwd=REPO, capture_output=True, text=True,
                       env=bad, timeout=60)
    assert r.returncode == 1 and "ACL not found" in r.stderr
    assert "not-a-token-the-registry-knows" not in r.stderr + r.stdout
