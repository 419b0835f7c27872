"""`edgegen bundle serve` publishes a store; `edgegen bundle pull` fetches from it."""

from __future__ import annotations

import subprocess
import sys

import httpx

from tests.support.procs import REPO, EdgegenProcess, free_port, wait_http


def test_bundle_pull_from_bundle_serve(tiny_genai_bundle, tmp_path):
    store = tiny_genai_bundle.path.parent.parent
    port = free_port()
    server = EdgegenProcess(["bundle", "serve", str(store), "--port", str(port)], tmp_path,
                            "serve")
    try:
        wait_http(f"http://127.0.0.1:{port}/index.json", proc=server.proc)
        index = httpx.get(f"http://127.0.0.1:{port}/index.json").json()
        entry = next(e for e in index if e["digest"] == tiny_genai_bundle.digest)
        cache = tmp_path / "cache"
        r = subprocess.run([sys.executable, "-m", "cli.main", "bundle", "pull", entry["url"],
                            "--store", str(cache)], cwd=REPO, capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 0, r.stdout + r.stderr
        assert tiny_genai_bundle.digest12 in r.stdout
        got = cache / tiny_genai_bundle.name / tiny_genai_bundle.digest12
        r = subprocess.run([sys.executable, "-m", "cli.main", "bundle", "verify", str(got)],
                           cwd=REPO, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stdout + r.stderr
    finally:
        server.stop()


def test_bundle_pull_of_an_unreachable_url_is_one_clear_line(tmp_path):
    url = f"http://127.0.0.1:{free_port()}/x/0123456789ab/"
    r = subprocess.run([sys.executable, "-m", "cli.main", "bundle", "pull", url, "--store",
                        str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "cannot reach" in r.stderr and "Traceback" not in r.stderr
