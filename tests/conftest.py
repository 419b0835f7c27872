"""Shared bundle fixtures, session-scoped: each bundle is exported once per test run.

Every fixture returns an ``edge_agent.bundle.Bundle`` built with ``exporters.export_model``:

- ``tiny_genai_bundle``: a tiny random llama (SmolLM2's real tokenizer and chat template, so
  text looks real) exported fp32 by the genai path (runtime onnxruntime-genai).
- ``tiny_optimum_bundle``: the same tiny model exported fp32 by optimum (runtime onnxruntime).
- ``tiny_embedding_bundle``: a tiny random BERT exported by optimum as feature-extraction
  with mean pooling.
- ``smollm2_int4_bundle`` / ``smollm2_fp32_bundle`` (genai) and ``smollm2_int8_bundle``
  (optimum): the real SmolLM2-135M-Instruct from ``builtin:smollm2-135m-instruct``.

The models are built from configs here, never downloaded. The dequantized SmolLM2 folder is
cached under $EDGEGEN_CACHE (default ~/.cache/edgegen), like any export would.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

TINY_THREADS = 2


@pytest.fixture(scope="session")
def bundle_store(tmp_path_factory) -> Path:
    """One store for all shared fixture bundles."""
    return tmp_path_factory.mktemp("bundle-store")


@pytest.fixture(scope="session")
def smollm2_source_dir() -> Path:
    """The built-in SmolLM2 dequantized to a Hugging Face folder (cached across runs)."""
    from exporters.sources import resolve_source

    return resolve_source("builtin:smollm2-135m-instruct").hf_dir


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, smollm2_source_dir) -> Path:
    """A tiny random LlamaForCausalLM saved as an HF folder with SmolLM2's tokenizer."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("tiny-llama")
    config = LlamaConfig(
        vocab_size=49152, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2,
        rms_norm_eps=1e-5, rope_theta=10000.0,
        # Wider than the default 0.02 so that the random logits are not near-ties, which
        # would make top-1 comparisons depend on rounding.
        initializer_range=0.1,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(out)
    GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=2).save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                 "chat_template.jinja"):
        if (smollm2_source_dir / name).is_file():
            shutil.copy2(smollm2_source_dir / name, out / name)
    return out


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory) -> Path:
    """A tiny random BertModel with a small WordPiece vocabulary built from English words."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    from exporters.validation import eval_text

    out = tmp_path_factory.mktemp("tiny-bert")
    words = sorted({w.strip(".,'\"?!").lower() for w in eval_text().split()} - {""})
    letters = list("abcdefghijklmnopqrstuvwxyz0123456789.,'\"?!:;()-_=+*/\\")
    vocab = (["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + letters
             + [f"##{c}" for c in letters] + words)
    vocab_file = out / "vocab.txt"
    vocab_file.write_text("\n".join(dict.fromkeys(vocab)) + "\n")
    tok = BertTokenizerFast(vocab_file=str(vocab_file), do_lower_case=True)
    config = BertConfig(vocab_size=len(tok), hidden_size=64, num_hidden_layers=2,
                        num_attention_heads=4, intermediate_size=128,
                        max_position_embeddings=256, architectures=["BertModel"])
    torch.manual_seed(0)
    BertModel(config).eval().save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_genai_bundle(tiny_llama_dir, bundle_store):
    from exporters.pipeline import export_model

    return export_model(str(tiny_llama_dir), name="tiny-llama-genai", precision="fp32",
                        exporter="genai", store=bundle_store, threads=TINY_THREADS)


@pytest.fixture(scope="session")
def tiny_optimum_bundle(tiny_llama_dir, bundle_store):
    from exporters.pipeline import export_model

    return export_model(str(tiny_llama_dir), name="tiny-llama-optimum", precision="fp32",
                        exporter="optimum", store=bundle_store, threads=TINY_THREADS)


@pytest.fixture(scope="session")
def tiny_embedding_bundle(tiny_bert_dir, bundle_store):
    from exporters.pipeline import export_model

    return export_model(str(tiny_bert_dir), name="tiny-bert", task="feature-extraction",
                        precision="fp32", store=bundle_store, threads=TINY_THREADS)


def _smollm2(precision: str, exporter: str, store: Path):
    from exporters.pipeline import export_model

    return export_model("builtin:smollm2-135m-instruct", name=f"smollm2-{precision}",
                        precision=precision, exporter=exporter, store=store,
                        threads=TINY_THREADS)


@pytest.fixture(scope="session")
def smollm2_int4_bundle(bundle_store):
    return _smollm2("int4", "genai", bundle_store)


@pytest.fixture(scope="session")
def smollm2_int8_bundle(bundle_store):
    return _smollm2("int8", "optimum", bundle_store)


@pytest.fixture(scope="session")
def smollm2_fp32_bundle(bundle_store):
    return _smollm2("fp32", "genai", bundle_store)


def read_manifest_json(bundle) -> dict:
    """The manifest as written on disk (what the agent reads)."""
    return json.loads((bundle.path / "edgegen.json").read_text())
