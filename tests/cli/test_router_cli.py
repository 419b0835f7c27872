"""`edgegen router`: its help, its refusals, and `traefik-config` against a real registry."""

import subprocess
import sys

import httpx
import pytest
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


@pytest.mark.parametrize("workers", [1, 2])
def test_a_taken_port_is_one_clear_error(workers):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = subprocess.run([sys.executable, "-m", "cli.main", "router", "--consul",
                            "http://127.0.0.1:1", "--port", str(port), "--workers",
                            str(workers)], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1] == \
        f"error: {'a router worker could not start: ' if workers > 1 else ''}cannot listen " \
        f"on 127.0.0.1:{port}: Address already in use"


def _socket_owners(port: int) -> dict[int, int]:
    """pid -> established TCP connections whose local port is ``port`` (from /proc)."""
    from pathlib import Path

    inodes = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[1].split(":")[1], 16) == port and fields[3] == "01":   # ESTABLISHED
            inodes.add(fields[9])
    owners: dict[int, int] = {}
    for fd_dir in Path("/proc").glob("[0-9]*/fd"):
        try:
            links = [str(p.readlink()) for p in fd_dir.iterdir()]
        except OSError:
            continue
        n = sum(1 for link in links if link[8:-1] in inodes and link.startswith("socket:["))
        if n:
            owners[int(fd_dir.parent.name)] = n
    return owners


def _workers(pid: int) -> set[int]:
    """The router workers ``pid`` started (spawned interpreters; not its resource tracker)."""
    from pathlib import Path

    out = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue
        if int(fields[1]) == pid and b"spawn_main" in cmdline:
            out.add(int(stat.parent.name))
    return out


def test_workers_share_the_port_and_the_metrics_and_one_that_dies_is_replaced(tmp_path):
    import os
    import signal
    import time

    from tests.cloud_router.registry_support import start_registry
    from tests.cloud_router.router_support import ServerThread, Upstream
    from tests.support.procs import EdgegenProcess, wait_http

    registry, consul = start_registry(tmp_path)
    upstream = Upstream("eu-1", region="eu-west")
    upstream.server = ServerThread(upstream.app())
    port = free_port()
    router = EdgegenProcess(["--log-level", "info", "router", "--consul", consul, "--port",
                             str(port), "--workers", "2"], tmp_path, "router")
    url = f"http://127.0.0.1:{port}"
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}
    try:
        ep = {"ID": f"edgegen-edge-eu-1-{upstream.server.port}", "Name": "edgegen-edge",
              "Address": "127.0.0.1", "Port": upstream.server.port,
              "Meta": {"node": "eu-1", "region": "eu-west", "tier": "edge", "model": "tiny"}}
        assert httpx.put(consul + "/v1/agent/service/register", json=ep).status_code == 200
        wait_http(url + "/readyz", timeout=60, proc=router.proc)
        workers = _workers(router.pid)
        assert len(workers) == 2, workers
        # connections held open at once: the kernel spreads them over both workers' sockets
        clients = [httpx.Client(base_url=url, timeout=30) for _ in range(24)]
        for c in clients:
            deadline = time.monotonic() + 30   # each worker's watcher loads the table
            while (r := c.post("/v1/chat/completions", json=chat)).status_code != 200 \
                    and time.monotonic() < deadline:
                time.sleep(0.2)
            assert r.status_code == 200, r.text
        owners = _socket_owners(port)
        assert set(owners) == workers, (owners, workers)
        answered = sum(1 for _ in clients)
        for c in clients:
            c.close()
        # any worker answers a scrape with every worker's count
        for _ in range(6):
            text = httpx.get(url + "/metrics", headers={"connection": "close"}).text
            line = next(x for x in text.splitlines()
                        if x.startswith('edgegen_router_requests_total{outcome="ok",tier="edge"}'))
            assert float(line.split()[-1]) >= answered, line
        victim = min(workers)
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while len(_workers(router.pid) - {victim}) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        now = _workers(router.pid)
        assert victim not in now and len(now) == 2 and router.alive()
        wait_http(url + "/readyz", timeout=60)
        for _ in range(4):   # new connections: whichever worker takes them answers
            r = httpx.post(url + "/v1/chat/completions", json=chat, timeout=30)
            assert r.status_code == 200, r.text
        started = time.monotonic()
        assert router.stop(timeout=40) == 0
        assert time.monotonic() - started < 35
        assert not [p for p in workers | now if os.path.exists(f"/proc/{p}")]
    finally:
        router.stop()
        upstream.server.stop()
        registry.stop()
