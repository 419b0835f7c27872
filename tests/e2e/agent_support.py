"""Start `edgegen agent` as a real process on a free port (alone, or registered behind a
router) and wait until it is ready."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from tests.support.procs import EdgegenProcess, free_port, wait_http


class Agent:
    def __init__(self, proc: EdgegenProcess, port: int):
        self.proc = proc
        self.port = port
        self.url = f"http://127.0.0.1:{port}"

    def stop(self, timeout: float = 60.0) -> int | None:
        return self.proc.stop(timeout)


def start_agent(bundle: str | Path, log_dir: Path, name: str = "agent", *extra: str,
                env: dict | None = None, timeout: float = 120.0) -> Agent:
    port = free_port()
    args = ["agent", "--bundle", str(bundle), "--node", name, "--port", str(port),
            "--threads", "2", *extra]
    proc = EdgegenProcess(args, log_dir, name, env=env)
    try:
        wait_http(f"http://127.0.0.1:{port}/readyz", timeout=timeout, proc=proc.proc)
    except Exception:
        proc.stop()
        raise RuntimeError(f"agent did not start:\n{proc.log()[-4000:]}")
    return Agent(proc, port)


class AgentBehindRouter:
    """A registry, one agent registered in it, and a router that found it: real processes."""

    def __init__(self, agent: EdgegenProcess, agent_url: str, router: EdgegenProcess,
                 router_url: str):
        self.agent, self.agent_url = agent, agent_url
        self.router, self.router_url = router, router_url


@contextlib.contextmanager
def agent_behind_router(tmp: Path, bundle, node: str, *extra: str, threads: int = 1,
                        env: dict | None = None) -> Iterator[AgentBehindRouter]:
    """Start the three, wait until agent and router are ready, stop them all afterwards."""
    from tests.cloud_router.registry_support import start_registry

    registry, consul = start_registry(tmp)
    agent_port, router_port = free_port(), free_port()
    agent = EdgegenProcess(["agent", "--bundle", str(bundle.path), "--node", node, "--port",
                            str(agent_port), "--consul", consul, "--threads", str(threads),
                            "--advertise-host", "127.0.0.1", *extra], tmp, "agent", env=env)
    router = EdgegenProcess(["router", "--consul", consul, "--port", str(router_port)], tmp,
                            "router")
    try:
        stack = AgentBehindRouter(agent, f"http://127.0.0.1:{agent_port}", router,
                                  f"http://127.0.0.1:{router_port}")
        wait_http(stack.agent_url + "/readyz", timeout=120, proc=agent.proc)
        wait_http(stack.router_url + "/readyz", timeout=60, proc=router.proc)
        yield stack
    finally:
        for p in (router, agent, registry):
            p.stop()
