"""A local fleet (`edgegen up`'s code) runs with Consul's ACLs and a fleet key: the registry
refuses the anonymous write, the router verifies every agent and answers, every secret sits in
a file only its owner may read, and no process's command line or log holds a token or the
key."""

from __future__ import annotations

import stat
import time
from pathlib import Path

import httpx
import yaml

from manifests.fleet import FleetOptions, start_fleet
from tests.support.procs import free_port


def test_a_local_fleet_keeps_its_secrets(tiny_genai_bundle, tmp_path):
    cluster = tmp_path / "cluster.yaml"
    cluster.write_text(yaml.safe_dump({"nodes": [
        {"name": "edge-eu-west", "region": "eu-west", "lat": 48.86, "lon": 2.35,
         "tier": "edge"},
        {"name": "central-1", "region": "eu-west", "tier": "central"}]}))
    fleet = start_fleet(FleetOptions(
        cluster=cluster, bundle=str(tiny_genai_bundle.path), router_port=free_port(),
        registry_port=free_port(), mqtt_port=free_port(), workdir=tmp_path / "fleet"))
    try:
        directory = fleet.secrets.directory
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700
        files = [p for p in directory.iterdir()]
        assert {p.name for p in files} >= {"registry-acl.json", "consul-management.token",
                                           "consul-agent.token", "consul-router.token",
                                           "fleet.key"}
        for p in files:
            assert stat.S_IMODE(p.stat().st_mode) == 0o600, p
        secrets = [p.read_text().strip() for p in files if p.suffix in (".token", ".key")]

        # the registry's ACLs are on: the anonymous write is refused
        r = httpx.put(f"{fleet.registry_url}/v1/agent/service/register", json={
            "Name": "edgegen-edge", "ID": "edgegen-edge-impostor-1", "Port": 1})
        assert r.status_code == 403 and "anonymous token" in r.text
        # the router verified every agent and routes to them (its /readyz, which the fleet
        # waits for, needs one endpoint: the other may join its table a moment later)
        want = {("edge-eu-west", "verified"), ("central-1", "verified")}
        deadline = time.monotonic() + 60
        while True:
            rows = httpx.get(fleet.router_url + "/edgegen/v1/endpoints").json()["endpoints"]
            seen = {(r["node"], r["identity"]) for r in rows}
            if seen == want or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert seen == want
        reply = httpx.post(fleet.router_url + "/v1/chat/completions", timeout=120, json={
            "model": fleet.bundle.name, "max_tokens": 4,
            "messages": [{"role": "user", "content": "Hello"}]})
        assert reply.status_code == 200 and reply.headers["x-edgegen-node"] == "edge-eu-west"

        # no process the fleet started carries a secret on its command line
        for name, proc in fleet.procs:
            if proc.poll() is None:
                cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes().decode(errors="replace")
                assert not any(s in cmdline for s in secrets), name
    finally:
        fleet.stop()
    logs = list((fleet.workdir / "logs").glob("*.log"))
    assert {p.stem for p in logs} >= {"registry", "router", "edge-eu-west-agent",
                                      "central-1-agent"}
    for p in logs:
        text = p.read_text(errors="replace")
        assert not any(s in text for s in secrets), p.name
