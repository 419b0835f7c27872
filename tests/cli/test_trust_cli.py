"""The token and fleet-key options of every command that takes a Consul address, and the
refusals of a configuration that cannot work (said plainly, no secret repeated)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from typer.testing import CliRunner

from cli.main import app
from tests.support.procs import REPO, free_port


@pytest.mark.parametrize("command, options", [
    (["registry"], ["--acl-file"]),
    (["router"], ["--consul-token", "--consul-token-file", "--fleet-key-file",
                  "--identity-recheck"]),
    (["router", "traefik-config"], ["--consul-token", "--consul-token-file"]),
    (["agent"], ["--consul-token", "--consul-token-file", "--fleet-key-file"]),
    (["status"], ["--consul-token", "--consul-token-file"]),
])
def test_help_names_the_options(command, options):
    result = CliRunner().invoke(app, [*command, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    for option in options:
        assert option in result.output


def run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    import os

    return subprocess.run([sys.executable, "-m", "cli.main", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})})


def test_a_bad_acl_file_stops_the_registry_at_once(tmp_path):
    acl = tmp_path / "acl.yaml"
    acl.write_text("tokens:\n  - secret_id: tiny-secret\n")
    r = run("registry", "--port", str(free_port()), "--acl-file", str(acl))
    assert r.returncode == 1 and "at least 16 characters" in r.stderr
    assert "tiny-secret" not in r.stderr
    r = run("registry", "--port", str(free_port()), "--acl-file", str(tmp_path / "none"))
    assert r.returncode == 1 and "cannot read the ACL file" in r.stderr


def test_a_short_fleet_key_stops_the_router(tmp_path):
    key = tmp_path / "key"
    key.write_text("too-short")
    r = run("router", "--port", str(free_port()), "--fleet-key-file", str(key))
    assert r.returncode == 1 and "shorter than 16 characters" in r.stderr
    assert "too-short" not in r.stderr
    r = run("router", "--port", str(free_port()), env={"EDGEGEN_FLEET_KEY": "tiny"})
    assert r.returncode == 1 and "EDGEGEN_FLEET_KEY holds a key shorter" in r.stderr
