"""A fleet of real processes: `edgegen registry` with a data dir, three `edgegen agent`s on
the tiny bundle, and the router's ServiceWatcher following them.

One agent starts before the registry (it serves and registers once the registry is up); a
SIGKILLed agent leaves the watcher's table within its check interval plus one second; a
SIGTERMed agent deregisters at once; a registry restarted with --data-dir still knows the
live services (same CreateIndex: nothing had to register again).
"""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from cloud_router.discovery import ServiceWatcher
from tests.cloud_router.registry_support import start_registry
from tests.support.procs import EdgegenProcess, free_port, wait_http

CHECK_INTERVAL = 2.0   # the agent's check interval (DESIGN.md)


def start_agent(bundle, node: str, consul_url: str, log_dir, store) -> tuple[EdgegenProcess, int]:
    port = free_port()
    proc = EdgegenProcess(
        ["--log-level", "info", "agent", "--bundle", str(bundle.path), "--node", node,
         "--port", str(port), "--consul", consul_url, "--threads", "1", "--region", "eu",
         "--lat", "52.5", "--lon", "13.4", "--store", str(store), "--drain-timeout", "5"],
        log_dir, node)
    return proc, port


async def until(predicate, timeout: float) -> float:
    t0 = time.monotonic()
    while not predicate():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(0.01)
    return time.monotonic() - t0


def nodes(watcher: ServiceWatcher) -> list[str]:
    return sorted(e.node for e in watcher.endpoints)


@pytest.mark.timeout(900)
def test_fleet_registers_fails_over_and_survives_a_registry_restart(tiny_genai_bundle,
                                                                    tmp_path):
    reg_port = free_port()
    consul_url = f"http://127.0.0.1:{reg_port}"
    store = tmp_path / "store"
    agents: dict[str, tuple[EdgegenProcess, int]] = {}
    registries = []

    async def scenario():
        # n1 starts before the registry exists: it must serve anyway.
        agents["n1"] = start_agent(tiny_genai_bundle, "n1", consul_url, tmp_path, store)
        proc, port = agents["n1"]
        await asyncio.to_thread(wait_http, f"http://127.0.0.1:{port}/readyz", 180, 200,
                                proc.proc)
        reg, _ = await asyncio.to_thread(start_registry, tmp_path, reg_port,
                                         tmp_path / "registry-data", "registry-1", 60.0)
        registries.append(reg)
        for node in ("n2", "n3"):
            agents[node] = start_agent(tiny_genai_bundle, node, consul_url, tmp_path, store)

        watcher = ServiceWatcher(consul_url, "edgegen-edge", wait="30s")
        task = asyncio.create_task(watcher.run())
        try:
            await until(lambda: nodes(watcher) == ["n1", "n2", "n3"], timeout=240)
            by_node = {e.node: e for e in watcher.endpoints}
            assert by_node["n1"].model == tiny_genai_bundle.name
            assert by_node["n1"].digest == tiny_genai_bundle.digest12
            assert by_node["n2"].id == f"edgegen-edge-n2-{agents['n2'][1]}"
            assert by_node["n3"].region == "eu" and by_node["n3"].lat == 52.5
            assert by_node["n3"].max_concurrency > 0
            # Let the registrations' burst of changes pass, so the watcher's rate limiter
            # has its tokens back before the failure that is measured.
            await asyncio.sleep(2.5)

            agents["n2"][0].kill()
            dropped = await until(lambda: nodes(watcher) == ["n1", "n3"], timeout=30)
            assert dropped <= CHECK_INTERVAL + 1.0, f"SIGKILLed agent dropped after {dropped:.2f}s"
            # Killed, not deregistered: Consul still knows it, as critical.
            known = httpx.get(f"{consul_url}/v1/agent/services").json()
            assert f"edgegen-edge-n2-{agents['n2'][1]}" in known

            stopping = agents["n3"][0]
            t0 = time.monotonic()
            code = await asyncio.to_thread(stopping.stop, 30)
            assert code == 0, stopping.log()[-2000:]
            await until(lambda: nodes(watcher) == ["n1"], timeout=5)
            known = httpx.get(f"{consul_url}/v1/agent/services").json()
            assert f"edgegen-edge-n3-{agents['n3'][1]}" not in known, "clean stop deregisters"
            assert time.monotonic() - t0 < 15

            n1_id = f"edgegen-edge-n1-{agents['n1'][1]}"
            before = httpx.get(f"{consul_url}/v1/health/service/edgegen-edge").json()
            create_index = {e["Service"]["ID"]: e["Service"]["CreateIndex"] for e in before}

            # Restart the registry on its data dir: it still knows the fleet.
            registries[0].kill()
            registries[0].stop()
            await until(lambda: watcher.stale, timeout=30)
            assert nodes(watcher) == ["n1"], "the table survives the outage"
            reg, _ = await asyncio.to_thread(start_registry, tmp_path, reg_port,
                                             tmp_path / "registry-data", "registry-2", 60.0)
            registries.append(reg)
            after = httpx.get(f"{consul_url}/v1/health/service/edgegen-edge").json()
            assert {e["Service"]["ID"]: e["Service"]["CreateIndex"] for e in after
                    if e["Service"]["ID"] == n1_id} == {n1_id: create_index[n1_id]}
            await until(lambda: not watcher.stale and nodes(watcher) == ["n1"], timeout=30)
            # The agent keeps serving throughout.
            r = httpx.get(f"http://127.0.0.1:{agents['n1'][1]}/readyz")
            assert r.status_code == 200
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    try:
        asyncio.run(scenario())
    except BaseException:
        for proc in [p for p, _ in agents.values()] + registries:
            text = proc.log_path.read_text(errors="replace")
            print(f"---- {proc.name} ----\n{text[-3000:]}")
        raise
    finally:
        for proc, _ in agents.values():
            proc.stop()
        for reg in registries:
            reg.stop()
