"""`edgegen status --target local` against a real `edgegen registry`: every agent, passing or
not, read the way the router reads it."""

import httpx
import pytest
from typer.testing import CliRunner

from cli.main import app
from manifests.deploy import AgentRow
from manifests.errors import ClusterError
from manifests.local_status import registry_status
from tests.cloud_router.registry_support import start_registry
from tests.support.procs import free_port

DIGEST = "d" * 64


def agent(node: str, tier: str, port: int, *, status: str, address: str = "127.0.0.1") -> dict:
    return {"Name": f"edgegen-{tier}", "ID": f"edgegen-{tier}-{node}-{port}", "Port": port,
            "Address": address,
            "Meta": {"node": node, "tier": tier, "model": "tiny", "digest": DIGEST,
                     "region": "eu", "zone": "eu-a"},
            "Check": {"TTL": "10m", "Status": status}}


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    proc, url = start_registry(tmp_path_factory.mktemp("local-status"))
    for body in (agent("edge-b", "edge", 8001, status="passing"),
                 agent("edge-a", "edge", 8002, status="critical"),
                 agent("central-1", "central", 8003, status="passing"),
                 agent("edge-c", "edge", 8004, status="passing", address="")):
        httpx.put(f"{url}/v1/agent/service/register", json=body).raise_for_status()
    yield url
    proc.stop()


def test_every_agent_with_its_readiness(registry):
    node_address = httpx.get(f"{registry}/v1/health/service/edgegen-edge").json()[0]["Node"][
        "Address"]
    bundle = f"tiny {DIGEST[:12]}"
    assert registry_status(registry) == [
        AgentRow("central-1", "central", bundle, True, "127.0.0.1:8003", "eu/eu-a"),
        AgentRow("edge-a", "edge", bundle, False, "127.0.0.1:8002", "eu/eu-a"),
        AgentRow("edge-b", "edge", bundle, True, "127.0.0.1:8001", "eu/eu-a"),
        # No service address: the node's, as the router (and Consul's DNS) would use.
        AgentRow("edge-c", "edge", bundle, True, f"{node_address}:8004", "eu/eu-a"),
    ]


def test_the_cli_prints_the_table(registry):
    r = CliRunner().invoke(app, ["status", "--target", "local", "--consul", registry],
                           env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    rows = [[cell.strip() for cell in line.split("│")[1:-1]]
            for line in r.output.splitlines() if "eu/eu-a" in line]
    assert [(row[0], row[1], row[3]) for row in rows] == [
        ("central-1", "central", "yes"), ("edge-a", "edge", "no"), ("edge-b", "edge", "yes"),
        ("edge-c", "edge", "yes")]
    assert {row[2] for row in rows} == {f"tiny {DIGEST[:12]}"}


def test_an_unreachable_registry_is_a_cluster_error():
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(ClusterError, match=f"cannot ask the registry at {url}"):
        registry_status(url)
