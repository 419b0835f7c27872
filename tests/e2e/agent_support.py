"""Start `edgegen agent` as a real process on a free port and wait until it is ready."""

from __future__ import annotations

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
