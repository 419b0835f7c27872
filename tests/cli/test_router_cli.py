"""`edgegen router`: its help, its refusals, and `traefik-config` against a real registry."""

import subprocess
import sys

import httpx
import yaml
from typer.testing import CliRunner

from cli.main import app as cli_app
from tests.support.procs import REPO, free_port


def test_cli_help_and_a_bad_api_key_file(tmp_path):
    runner = CliRunner()
    result = runner.invoke(cli_app, ["router", "--help"])
    assert result.exit_code == 0 and "--consul" in result.output
    assert "traefik-config" in result.output
    empty = tmp_path / "keys"
    empty.write_text("# no keys yet\n")
    r = subprocess.run([sys.executable, "-m", "cli.main", "router", "--api-keys", str(empty),
                        "--port", str(free_port())], cwd=REPO, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 1 and "holds no key" in r.stderr


def test_traefik_config_command_reads_the_registry(tmp_path):
    from tests.cloud_router.registry_support import start_registry

    registry, consul = start_registry(tmp_path)
    try:
        edge = {"ID": "edgegen-edge-a-9001", "Name": "edgegen-edge", "Address": "127.0.0.1",
                "Port": 9001, "Meta": {"node": "a", "region": "eu-west", "tier": "edge",
                                       "model": "tiny"}}
        assert httpx.put(consul + "/v1/agent/service/register", json=edge).status_code == 200
        out = tmp_path / "traefik.yaml"
        r = subprocess.run([sys.executable, "-m", "cli.main", "router", "traefik-config",
                            "--consul", consul, "-o", str(out)], cwd=REPO, capture_output=True,
                           text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        cfg = yaml.safe_load(out.read_text())["http"]
        servers = cfg["services"]["edgegen-edge-eu-west"]["loadBalancer"]["servers"]
        assert servers == [{"url": "http://127.0.0.1:9001"}]
    finally:
        registry.stop()
