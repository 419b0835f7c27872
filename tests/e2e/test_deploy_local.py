"""`edgegen deploy --target local` runs the rendered specs; agents register and answer
through the router, and `edgegen status --target local` lists them."""

import os
import subprocess
import sys

import httpx
import pytest

from tests.support.procs import REPO, EdgegenProcess, free_port, wait_http


def _deploy_local(bundle, tmp_path):
    router, registry, mqtt = free_port(), free_port(), free_port()
    proc = EdgegenProcess(["deploy", str(bundle.path), "--target", "local",
                           "--router-port", str(router), "--registry-port", str(registry),
                           "--mqtt-port", str(mqtt)], tmp_path, "deploy-local")
    return proc, router, registry


def _check(bundle, tmp_path):
    proc, router, registry = _deploy_local(bundle, tmp_path)
    try:
        wait_http(f"http://127.0.0.1:{router}/readyz", timeout=480, proc=proc.proc)
        r = httpx.post(f"http://127.0.0.1:{router}/v1/chat/completions", timeout=300, json={
            "model": bundle.name, "max_tokens": 8,
            "messages": [{"role": "user", "content": "Hello"}]})
        assert r.status_code == 200, r.text
        answer = r.json()["choices"][0]["message"]["content"]
        assert isinstance(answer, str) and answer != "", r.text
        assert r.headers["x-edgegen-node"].startswith("edge-")
        st = subprocess.run([sys.executable, "-m", "cli.main", "status", "--target", "local",
                             "--consul", f"http://127.0.0.1:{registry}"], cwd=REPO,
                            capture_output=True, text=True, timeout=60,
                            env={**os.environ, "COLUMNS": "200"})
        assert st.returncode == 0, st.stderr
        for node in ("edge-eu-west", "edge-us-east", "edge-ap-south", "central-1"):
            assert node in st.stdout
        assert bundle.digest12 in st.stdout
    finally:
        exit_code = proc.stop(timeout=60)   # SIGTERM: the fleet stops as on Ctrl-C
    log = proc.log_path.read_text(errors="replace")
    assert exit_code == 0, f"deploy exited with {exit_code}:\n{log[-3000:]}"
    assert "stopping" in log


def test_deploy_local_tiny(tiny_genai_bundle, tmp_path):
    _check(tiny_genai_bundle, tmp_path)


@pytest.mark.smollm2
def test_deploy_local_smollm2_int8(smollm2_int8_bundle, tmp_path):
    _check(smollm2_int8_bundle, tmp_path)
