import json
import hashlib

import pytest

from edge_agent.bundle import staging_dir, write_bundle


@pytest.fixture(scope="session")
def fake_bundle(tmp_path_factory):
    """A small, well-formed bundle directory (no model inside: deploy only reads its manifest)."""
    store = tmp_path_factory.mktemp("store")
    stage = staging_dir(store)
    (stage / "model.onnx").write_bytes(b"not a real model")
    manifest = {
        "name": "tiny-test", "task": "text-generation", "runtime": "onnxruntime",
        "exporter": "test", "source": {"kind": "test", "reference": "none", "sha256": "0" * 64},
        "precision": "int8", "signature": {}, "context_length": 128, "validation": {},
    }
    return write_bundle(stage, manifest, store)
