"""Reading export sources: bad files fail fast with one clear line, good ones resolve."""

import json
import time

import numpy as np
import pytest

from exporters.errors import SourceError, UnsupportedModel
from exporters.sources import resolve_source


def test_missing_gguf_file(tmp_path):
    with pytest.raises(SourceError, match="does not exist"):
        resolve_source(str(tmp_path / "nope.gguf"))


def test_a_file_that_is_not_gguf(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"PK\x03\x04 this is a zip, not a model" * 10)
    with pytest.raises(SourceError, match="not a GGUF file"):
        resolve_source(str(bad))


def test_a_truncated_gguf(tmp_path):
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00\xff")
    with pytest.raises(SourceError, match="not a readable GGUF"):
        resolve_source(str(bad))


def test_a_gguf_that_is_not_an_llm(tmp_path):
    from gguf import GGUFWriter

    path = tmp_path / "clip.gguf"
    w = GGUFWriter(str(path), "clip")
    w.add_tensor("v.patch_embd.weight", np.zeros((4, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(UnsupportedModel, match="GGUF architecture 'clip'"):
        resolve_source(str(path))


def test_unknown_builtin():
    with pytest.raises(SourceError,
                       match="built-in models: all-minilm-l6-v2, gemma3-270m, "
                             "smollm2-135m-instruct"):
        resolve_source("builtin:gpt-5")


def test_folder_without_config(tmp_path):
    with pytest.raises(SourceError, match="config.json is missing"):
        resolve_source(str(tmp_path))


def test_folder_without_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(SourceError, match="holds no weights"):
        resolve_source(str(tmp_path))


def test_hub_id_fails_within_seconds_when_the_hub_is_unreachable(monkeypatch):
    # This machine reaches no hub; force it for machines that do.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.monotonic()
    with pytest.raises(SourceError, match="hub .* is not reachable"):
        resolve_source("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert time.monotonic() - t0 < 10


def test_hub_probe_without_the_offline_flag_returns_within_its_timeout(monkeypatch):
    from exporters import sources

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    t0 = time.monotonic()
    # A reserved, unroutable TEST-NET address: the connect can only time out.
    assert sources.hub_reachable("192.0.2.1", timeout=1.0) is False
    assert time.monotonic() - t0 < 5


def test_builtin_resolves_to_a_dequantized_hf_folder(smollm2_source_dir):
    src = resolve_source("builtin:smollm2-135m-instruct")
    assert src.hf_dir == smollm2_source_dir
    assert src.kind == "builtin" and len(src.sha256) == 64
    cfg = src.config()
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["num_hidden_layers"] == 30
    assert (src.hf_dir / "tokenizer.json").is_file()


def test_a_gguf_tensor_type_the_loader_cannot_dequantize(tmp_path, monkeypatch):
    from gguf import GGMLQuantizationType

    from tests.exporters.gguf_support import write_tiny_llama_gguf

    monkeypatch.setenv("EDGEGEN_CACHE", str(tmp_path / "cache"))
    path = write_tiny_llama_gguf(tmp_path / "q8k.gguf", raw_types={
        "blk.1.ffn_down.weight": GGMLQuantizationType.Q8_K})
    with pytest.raises(UnsupportedModel) as info:
        resolve_source(str(path))
    message = str(info.value)
    assert "tensor blk.1.ffn_down.weight is Q8_K" in message
    assert "cannot dequantize" in message and "\n" not in message
    # refused before transformers loaded the file: nothing was dequantized into the cache
    assert not (tmp_path / "cache" / "sources").exists() or not any(
        (tmp_path / "cache" / "sources").iterdir())
