"""Shared bundle fixtures, session-scoped: each bundle is exported once per test run.

Every fixture returns an ``edge_agent.bundle.Bundle`` built with ``exporters.export_model``:

- ``tiny_genai_bundle``: a tiny random llama (SmolLM2's real tokenizer and chat template, so
  text looks real) exported fp32 by the genai path (runtime onnxruntime-genai).
- ``tiny_optimum_bundle``: the same tiny model exported fp32 by optimum (runtime onnxruntime).
- ``tiny_embedding_bundle``: a tiny random BERT exported by optimum as feature-extraction
  with mean pooling.
- ``minilm_bundle``: the real all-MiniLM-L6-v2 from ``builtin:all-minilm-l6-v2`` (fp32).
- ``smollm2_int4_bundle`` / ``smollm2_fp32_bundle`` (genai) and ``smollm2_int8_bundle``
  (optimum): the real SmolLM2-135M-Instruct from ``builtin:smollm2-135m-instruct``.

- ``fake_bundle``: a well-formed bundle with no model inside, for what only reads manifests
  (deploy, render, status).

The models are built from configs here, never downloaded. The dequantized SmolLM2 folder is
cached under $EDGEGEN_CACHE (default ~/.cache/edgegen), like any export would.

Text-only tests need no exported model: ``bpe_tokenizer_dir`` / ``bpe_tokenizer`` are a small
byte-level BPE trained here in milliseconds, with SmolLM2's ChatML special tokens at SmolLM2's
ids (``<|endoftext|>`` 0, ``<|im_start|>`` 1, ``<|im_end|>`` 2).

The fast layer: every test under ``tests/e2e/`` and every test that uses an exported bundle
(any fixture in ``SLOW_FIXTURES``, directly or through another fixture) is marked ``slow``,
so ``pytest -m "not slow"`` runs the rest: the fast layer, fakes and real local processes.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

TINY_THREADS = 2

# Fixtures that export (or build the source of) a model; a test using any of them is slow.
SLOW_FIXTURES = frozenset({
    "tiny_genai_bundle", "tiny_optimum_bundle", "tiny_embedding_bundle", "minilm_bundle",
    "smollm2_source_dir", "tiny_llama_dir", "tiny_bert_dir", "gemma3_bundle",
})
SLOW_FIXTURE_PREFIX = "smollm2_"
E2E_DIR = Path(__file__).parent / "e2e"


def is_slow(item: pytest.Item) -> bool:
    """End-to-end, or needs an exported model (``fixturenames`` is the whole closure)."""
    if E2E_DIR in Path(item.path).parents:
        return True
    names = getattr(item, "fixturenames", ())
    return any(n in SLOW_FIXTURES or n.startswith(SLOW_FIXTURE_PREFIX) for n in names)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if is_slow(item):
            item.add_marker(pytest.mark.slow)


# --- a small tokenizer, for tests of text handling -------------------------------------------

CHATML_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")

# What the BPE is trained on: enough English for merges that look like words. Text outside it
# (accents, CJK, emoji) falls back to single bytes, so multi-byte characters span tokens.
TRAINING_TEXT = (
    "The quick brown fox jumps over the lazy dog. Hello there! How are you today? I am fine, "
    "thank you. The weather is nice and the sun is shining over the green hills.",
    "Paris is the capital of France. Berlin is the capital of Germany. Tokyo is the capital "
    "of Japan, and Rome is the capital of Italy. What is the capital of Spain?",
    "Tell me a joke with two lines. Why did the chicken cross the road? To get to the other "
    "side. That is the end of the story; the end of the line, and then we stop.",
    "You are a helpful assistant. You are terse. The user asks a question and the assistant "
    "answers it in one short sentence, then says goodbye and stops.",
)


@pytest.fixture(scope="session")
def bpe_tokenizer_dir(tmp_path_factory) -> Path:
    """A byte-level BPE (400 tokens) with ChatML special tokens: ``tokenizer.json`` and a
    ``tokenizer_config.json`` naming its special tokens, as in a Hugging Face folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    out = tmp_path_factory.mktemp("bpe-tokenizer")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=list(CHATML_SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(TRAINING_TEXT * 3, trainer)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 2048,
        "bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|im_end|>",
        "unk_token": "<|endoftext|>", "clean_up_tokenization_spaces": False,
    }, indent=2))
    return out


@pytest.fixture(scope="session")
def bpe_tokenizer(bpe_tokenizer_dir):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(bpe_tokenizer_dir / "tokenizer.json"))


# --- exported bundles ---------------------------------------------------------------------------


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


@pytest.fixture(scope="session")
def minilm_bundle(bundle_store):
    """The real all-MiniLM-L6-v2 (``builtin:all-minilm-l6-v2``), fp32, as served."""
    from exporters.pipeline import export_model

    return export_model("builtin:all-minilm-l6-v2", task="feature-extraction",
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


@pytest.fixture(scope="session")
def gemma3_bundle(bundle_store):
    """The real Gemma 3 270M (``builtin:gemma3-270m``) at its default precision (int8)."""
    from exporters.pipeline import export_model

    return export_model("builtin:gemma3-270m", store=bundle_store, threads=TINY_THREADS)


def read_manifest_json(bundle) -> dict:
    """The manifest as written on disk (what the agent reads)."""
    return json.loads((bundle.path / "edgegen.json").read_text())


@pytest.fixture(scope="session")
def fake_bundle(tmp_path_factory):
    """A small, well-formed bundle directory (no model inside: deploy only reads its manifest)."""
    from edge_agent.bundle import staging_dir, write_bundle

    store = tmp_path_factory.mktemp("store")
    stage = staging_dir(store)
    (stage / "model.onnx").write_bytes(b"not a real model")
    manifest = {
        "name": "tiny-test", "task": "text-generation", "runtime": "onnxruntime",
        "exporter": "test", "source": {"kind": "test", "reference": "none", "sha256": "0" * 64},
        "precision": "int8", "signature": {}, "context_length": 128, "validation": {},
    }
    return write_bundle(stage, manifest, store)
