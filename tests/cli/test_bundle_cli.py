"""`edgegen bundle verify` and `edgegen export` as processes: a tampered bundle, an interrupted export."""

import shutil
import signal
import subprocess
import sys
import time

import pytest

from edge_agent.bundle import (
    iter_bundles,
    staging_dir,
)
from tests.support.procs import REPO


def test_real_bundle_tamper_detected_by_the_cli(tiny_genai_bundle, tmp_path):
    """`edgegen bundle verify` on a copy of a real exported bundle with one byte flipped."""
    copy = tmp_path / "copy"
    shutil.copytree(tiny_genai_bundle.path, copy)
    ok = subprocess.run([sys.executable, "-m", "cli.main", "bundle", "verify", str(copy)],
                        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert "ok" in ok.stdout and tiny_genai_bundle.digest12 in ok.stdout
    data = copy / "model.onnx.data"
    with open(data, "r+b") as f:
        f.seek(data.stat().st_size // 3)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))
    bad = subprocess.run([sys.executable, "-m", "cli.main", "bundle", "verify", str(copy)],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1
    assert "model.onnx.data: sha256 mismatch" in bad.stderr
    assert "Traceback" not in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1


def test_interrupted_export_leaves_no_bundle(tiny_llama_dir, tmp_path):
    """SIGKILL an export while it writes: the store holds no bundle, only a hidden staging
    directory that no reader lists."""
    store = tmp_path / "store"
    proc = subprocess.Popen(
        [sys.executable, "-m", "cli.main", "export", str(tiny_llama_dir), "--precision", "fp32",
         "--exporter", "genai", "--out", str(store), "--name", "killed", "--threads", "1"],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if list(store.glob(".staging-*/model.onnx*")):
                break
            assert proc.poll() is None, "the export ended before it was interrupted"
            time.sleep(0.05)
        else:
            pytest.fail("the export never started writing its graph")
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert list(iter_bundles(store)) == []
    assert not (store / "killed").exists()
    assert all(p.name.startswith(".") for p in store.iterdir())
    # The next writer sweeps the dead export's staging directory away.
    mine = staging_dir(store)
    assert [p.name for p in store.glob(".staging-*")] == [mine.name]
