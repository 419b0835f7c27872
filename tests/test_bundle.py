"""The bundle contract: write, verify, tamper detection, atomic writes under interruption."""

import json
import os
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
