"""The bundle contract: write, verify, tamper detection, atomic writes under interruption."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edge_agent.bundle import (
    MANIFEST_NAME,
    iter_bundles,
    manifest_digest,
    open_bundle,
    staging_dir,
    write_bundle,
)
from edge_agent.errors import BundleFormatError, BundleIntegrityError, BundleNotFound
from tests.support.procs import REPO

MANIFEST = {
    "name": "toy", "task": "text-generation", "runtime": "onnxruntime", "exporter": "optimum",
    "source": {"kind": "hf-dir", "reference": "/x", "sha256": None}, "precision": "fp32",
    "signature": {}, "context_length": 64, "validation": {},
}


def toy_bundle(store: Path):
    staging = staging_dir(store)
    (staging / "model.onnx").write_bytes(b"graph" * 100)
    (staging / "model.onnx.data").write_bytes(os.urandom(4096))
    (staging / "tokenizer.json").write_text("{}")
    return write_bundle(staging, MANIFEST, store)


def test_write_is_content_addressed_and_verifies(tmp_path):
    b = toy_bundle(tmp_path)
    assert b.path == (tmp_path / "toy" / b.digest[:12]).resolve()
    m = json.loads((b.path / MANIFEST_NAME).read_text())
    assert manifest_digest(m) == b.digest
    assert set(m["files"]) == {"model.onnx", "model.onnx.data", "tokenizer.json"}
    assert open_bundle(b.path).digest == b.digest
    assert [x.path for x in iter_bundles(tmp_path)] == [b.path]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".staging")]


@pytest.mark.parametrize("victim", ["model.onnx.data", "model.onnx"])
def test_one_flipped_byte_is_named(tmp_path, victim):
    b = toy_bundle(tmp_path)
    path = b.path / victim
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(BundleIntegrityError) as err:
        open_bundle(b.path)
    assert err.value.problems == [f"{victim}: sha256 mismatch"]


def test_missing_extra_and_truncated_files(tmp_path):
    b = toy_bundle(tmp_path)
    (b.path / "tokenizer.json").unlink()
    (b.path / "evil.py").write_text("print('hi')")
    with open(b.path / "model.onnx", "ab") as f:
        f.write(b"x")
    with pytest.raises(BundleIntegrityError) as err:
        open_bundle(b.path)
    assert sorted(err.value.problems) == sorted([
        "tokenizer.json: missing", "evil.py: not listed in the manifest",
        "model.onnx: size 501 != 500 in manifest"])


def test_edited_manifest_changes_the_digest_and_bad_manifests_are_refused(tmp_path):
    b = toy_bundle(tmp_path)
    mpath = b.path / MANIFEST_NAME
    m = json.loads(mpath.read_text())
    m["precision"] = "int4"
    mpath.write_text(json.dumps(m))
    assert open_bundle(b.path).digest != b.digest
    m["files"]["../../etc/passwd"] = {"sha256": "0", "size": 1}
    mpath.write_text(json.dumps(m))
    with pytest.raises(BundleFormatError, match="escapes the bundle"):
        open_bundle(b.path)
    mpath.write_text("{not json")
    with pytest.raises(BundleFormatError, match="not valid JSON"):
        open_bundle(b.path)
    with pytest.raises(BundleNotFound):
        open_bundle(tmp_path / "nothing")


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


def test_interrupt_inside_the_process_cleans_up(tiny_llama_dir, tmp_path, monkeypatch):
    """Ctrl-C during validation: staging and work directories are removed."""
    from exporters import validation
    from exporters.pipeline import export_model

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(validation, "validate_causal", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export_model(str(tiny_llama_dir), precision="fp32", exporter="genai", store=tmp_path,
                     threads=1)
    assert list(tmp_path.iterdir()) == []
