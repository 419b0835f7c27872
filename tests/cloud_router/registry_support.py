"""Helpers for tests that need a real `edgegen registry` process or a /readyz to check."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from tests.support.procs import EdgegenProcess, free_port, wait_http


def start_registry(log_dir: Path, port: int | None = None, data_dir: Path | None = None,
                   name: str = "registry", min_deregister_after: float = 0.0,
                   acl_file: Path | None = None, debug: bool = False
                   ) -> tuple[EdgegenProcess, str]:
    """`edgegen registry` on ``port`` (a free one by default); returns it and its URL once
    /v1/status/leader answers. ``acl_file`` turns Consul's ACLs on; ``debug`` logs every
    request (uvicorn's access log)."""
    port = port or free_port()
    args = ["--debug" if debug else "--log-level", *([] if debug else ["info"]), "registry",
            "--port", str(port), "--min-deregister-after", str(min_deregister_after)]
    if data_dir is not None:
        args += ["--data-dir", str(data_dir)]
    if acl_file is not None:
        args += ["--acl-file", str(acl_file)]
    proc = EdgegenProcess(args, log_dir, name)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/v1/status/leader", timeout=60, proc=proc.proc)
    except Exception:
        log = proc.log()
        proc.stop()
        raise RuntimeError(f"registry did not start:\n{log[-3000:]}") from None
    return proc, url


class ReadyServer:
    """A tiny HTTP server standing in for an agent's /readyz; ``status`` is what it answers."""

    def __init__(self):
        self.status = 200
        self.hits = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's naming
                outer.hits += 1
                code = outer.status if self.path == "/readyz" else 404
                body = b"ready" if code == 200 else b"not ready"
                self.send_response(code)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/readyz"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
