"""`edgegen agent`: the errors a user sees at start-up, in one line, and its flags."""

from __future__ import annotations

import subprocess
import sys

from tests.support.procs import REPO


def test_agent_cli_refuses_an_absent_device_at_startup(tiny_genai_bundle):
    r = subprocess.run([sys.executable, "-m", "cli.main", "agent", "--bundle",
                        str(tiny_genai_bundle.path), "--node", "n", "--port", "1",
                        "--device", "cuda"], cwd=REPO, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 1
    assert "CUDAExecutionProvider" in r.stderr and "Traceback" not in r.stderr


def test_agent_cli_refuses_a_missing_bundle(tmp_path):
    r = subprocess.run([sys.executable, "-m", "cli.main", "agent", "--bundle",
                        str(tmp_path / "nope"), "--node", "n", "--port", "1"], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "no bundle" in r.stderr


def test_agent_help_lists_the_contract_flags():
    r = subprocess.run([sys.executable, "-m", "cli.main", "agent", "--help"], cwd=REPO,
                       capture_output=True, text=True, timeout=120, env={"COLUMNS": "200",
                                                                          "PATH": "/usr/bin"})
    for flag in ("--bundle", "--node", "--tier", "--region", "--zone", "--lat", "--lon",
                 "--host", "--port", "--device", "--threads", "--max-concurrency",
                 "--queue-size", "--store", "--admin-token", "--consul", "--mqtt",
                 "--mqtt-ca-file", "--advertise-host"):
        assert flag in r.stdout, flag


def test_agent_cli_reports_a_model_that_cannot_load_in_one_line(tiny_genai_bundle, tmp_path):
    """A bundle whose hashes match but whose graph is not ONNX: one error line, exit 1."""
    import shutil

    from edge_agent.bundle import staging_dir, write_bundle

    store = tmp_path / "store"
    staging = staging_dir(store)
    for rel in tiny_genai_bundle.manifest["files"]:
        shutil.copy(tiny_genai_bundle.file(rel), staging / rel)
    for graph in staging.glob("*.onnx"):  # model.onnx, and the CPU engine's model.last_logits
        graph.write_bytes(b"not an onnx graph")
    manifest = {k: v for k, v in tiny_genai_bundle.manifest.items() if k != "files"}
    broken = write_bundle(staging, {**manifest, "name": "broken"}, store)

    r = subprocess.run([sys.executable, "-m", "cli.main", "agent", "--bundle", str(broken.path),
                        "--node", "n", "--port", "1"], cwd=REPO, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 1
    assert "Traceback" not in r.stderr
    assert "cannot load" in r.stderr and str(broken.path) in r.stderr
