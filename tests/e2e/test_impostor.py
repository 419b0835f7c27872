"""The impostor attack, end to end, with real processes: `edgegen registry` with ACLs, two real
`edgegen agent` processes and `edgegen router`, each given its Consul token and the fleet key
through files and the environment only; an impostor HTTP server that registers with a leaked
write token, copies the nearest edge's Meta and relays the router's nonce to the real agent.

Before: the router sent 19 of 20 prompts with the nearest-region hint to the impostor. Now the
impostor receives none, the real agents keep serving, the impostor cannot deregister a real
agent, and no token or key appears in any process's log or command line."""

from __future__ import annotations

import threading
import time
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from cloud_router.credentials import write_fleet_secrets
from tests.cloud_router.registry_support import start_registry
from tests.support.procs import EdgegenProcess, free_port, wait_http

PARIS = {"x-edgegen-region": "eu-west"}


class Impostor:
    """Answers /readyz, counts the prompts it receives (answering them plausibly), and
    relays identity requests to ``real`` (an agent's URL)."""

    def __init__(self, real: str):
        outer = self
        self.prompts = 0

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def reply(self, code: int, body: bytes) -> None:
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):  # noqa: N802
                url = urllib.parse.urlsplit(self.path)
                if url.path == "/edgegen/v1/identity":
                    with urllib.request.urlopen(f"{real}{self.path}", timeout=5) as r:
                        return self.reply(200, r.read())
                self.reply(200 if url.path == "/readyz" else 404, b'{"status": "ok"}')

            def do_POST(self):  # noqa: N802
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                outer.prompts += 1
                self.reply(200, b'{"id": "x", "object": "chat.completion", "choices": []}')

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def fleet(tmp_path_factory, tiny_genai_bundle):
    tmp = tmp_path_factory.mktemp("impostor")
    secrets = write_fleet_secrets(tmp / "secrets")
    values = {p.name: p.read_text().strip() for p in secrets.directory.iterdir()
              if p.suffix in (".token", ".key")}
    registry, consul = start_registry(tmp, acl_file=secrets.acl_file)
    procs = {"registry": registry}
    agent_env = {"CONSUL_HTTP_TOKEN_FILE": str(secrets.token_file("agent")),
                 "EDGEGEN_FLEET_KEY_FILE": str(secrets.fleet_key_file)}
    ports = {}
    impostor = None
    try:
        for node, region, lat, lon in (("edge-near", "eu-west", 48.86, 2.35),
                                       ("edge-far", "us-east", 38.95, -77.45)):
            ports[node] = free_port()
            procs[node] = EdgegenProcess(
                ["--log-level", "info", "agent", "--bundle", str(tiny_genai_bundle.path),
                 "--node", node, "--port", str(ports[node]), "--region", region,
                 "--lat", str(lat), "--lon", str(lon), "--consul", consul, "--threads", "1"],
                tmp, node, env=agent_env)
        router_port = free_port()
        procs["router"] = EdgegenProcess(
            ["--log-level", "info", "router", "--consul", consul, "--port", str(router_port)],
            tmp, "router", env={"CONSUL_HTTP_TOKEN_FILE": str(secrets.token_file("router")),
                                "EDGEGEN_FLEET_KEY_FILE": str(secrets.fleet_key_file)})
        for node in ("edge-near", "edge-far"):
            wait_http(f"http://127.0.0.1:{ports[node]}/readyz", timeout=180,
                      proc=procs[node].proc)
        url = f"http://127.0.0.1:{router_port}"
        wait_http(url + "/healthz", timeout=60, proc=procs["router"].proc)
        impostor = Impostor(f"http://127.0.0.1:{ports['edge-near']}")
        yield {"consul": consul, "url": url, "values": values, "procs": procs,
               "impostor": impostor, "ports": ports, "model": tiny_genai_bundle.name}
    finally:
        for name in ("router", "edge-near", "edge-far", "registry"):
            if name in procs:
                procs[name].stop(60)
        if impostor is not None:
            impostor.close()


def rows(url: str) -> dict[str, dict]:
    return {r["id"]: r for r in httpx.get(url + "/edgegen/v1/endpoints").json()["endpoints"]}


def until(condition, timeout: float, describe) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(describe())


def copied_registration(fleet, service_id: str) -> dict:
    """The nearest edge's registration as the impostor copies it, with its own address."""
    entries = httpx.get(f"{fleet['consul']}/v1/health/service/edgegen-edge",
                        headers={"X-Consul-Token": fleet["values"]["consul-router.token"]}
                        ).json()
    (near,) = [e["Service"] for e in entries if e["Service"]["Meta"]["node"] == "edge-near"]
    port = fleet["impostor"].port
    return {"Name": "edgegen-edge", "ID": service_id, "Address": "127.0.0.1", "Port": port,
            "Tags": near["Tags"], "Meta": near["Meta"],
            "Check": {"HTTP": f"http://127.0.0.1:{port}/readyz", "Interval": "1s",
                      "Timeout": "1s"}}


def test_the_impostor_gets_no_prompt_and_real_agents_keep_serving(fleet):
    url, impostor, values = fleet["url"], fleet["impostor"], fleet["values"]
    until(lambda: len(rows(url)) == 2 and all(r["identity"] == "verified"
                                              for r in rows(url).values()),
          60, lambda: f"agents not verified: {rows(url)}")
    impostor_id = f"edgegen-edge-edge-near-{impostor.port}"
    body = copied_registration(fleet, impostor_id)
    register = f"{fleet['consul']}/v1/agent/service/register"
    # no token, or the router's read token: refused with Consul's text
    r = httpx.put(register, json=body)
    assert r.status_code == 403 and r.text.startswith(
        "Permission denied: anonymous token lacks permission 'service:write' on "
        "\"edgegen-edge\"")
    r = httpx.put(register, json=body,
                  headers={"X-Consul-Token": values["consul-router.token"]})
    assert r.status_code == 403 and "lacks permission 'service:write'" in r.text
    # nor may the impostor deregister a real agent
    near_id = f"edgegen-edge-edge-near-{fleet['ports']['edge-near']}"
    r = httpx.put(f"{fleet['consul']}/v1/agent/service/deregister/{near_id}")
    assert r.status_code == 403
    r = httpx.put(f"{fleet['consul']}/v1/agent/service/deregister/{near_id}",
                  headers={"X-Consul-Token": values["consul-router.token"]})
    assert r.status_code == 403
    # with a leaked write token it registers, passes its health check, and is in the table
    r = httpx.put(register, json=body, headers={"X-Consul-Token": values["consul-agent.token"]})
    assert r.status_code == 200
    row = until(lambda: rows(url).get(impostor_id, {}).get("identity") == "failed"
                and rows(url)[impostor_id], 30, lambda: f"impostor not judged: {rows(url)}")
    assert "wrong MAC" in row["identity_reason"]
    assert row["node"] == "edge-near" and row["region"] == "eu-west"   # a perfect copy
    impostor.prompts = 0
    answered_by = []
    for _ in range(20):
        r = httpx.post(url + "/v1/chat/completions", headers=PARIS, timeout=120, json={
            "model": fleet["model"], "max_tokens": 4, "temperature": 0,
            "messages": [{"role": "user", "content": "Hello"}]})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["role"] == "assistant"
        answered_by.append(r.headers["x-edgegen-node"])
    assert impostor.prompts == 0
    assert answered_by == ["edge-near"] * 20
    explain = httpx.get(url + "/edgegen/v1/route",
                        params={"model": fleet["model"], "region": "eu-west"}).json()
    assert explain["skipped"] == {impostor_id: "identity-failed"}
    assert explain["endpoint"]["id"] == near_id
    assert 'edgegen_router_endpoint_identity{state="failed",tier="edge"} 1.0' in \
        httpx.get(url + "/metrics").text
    # the real agents are registered, passing, and were never deregistered
    assert {r["identity"] for i, r in rows(url).items() if i != impostor_id} == {"verified"}


def test_no_token_or_key_in_any_log_or_command_line(fleet):
    secrets = list(fleet["values"].values())
    for name, proc in fleet["procs"].items():
        cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes().decode(errors="replace")
        assert not any(s in cmdline for s in secrets), name
        log = proc.log()
        assert log.strip(), name
        assert not any(s in log for s in secrets), name
