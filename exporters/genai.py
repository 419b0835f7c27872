"""The genai export path: onnxruntime-genai's model builder.

The builder writes one fused decoder graph (GroupQueryAttention, rotary embeddings and a KV
buffer shared between past and present) plus ``genai_config.json``; on SmolLM2-135M it
decodes several times faster than an Optimum export at equal precision. It runs as a child
process: it holds the whole model in memory while it writes, and its imports stay out of
ours. onnxruntime-genai is pinned at 0.15.2: the 0.16+ builders import names that exist only
in transformers 5.x, while optimum-onnx 0.1.0 pins transformers < 4.58.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from exporters import int4_recipe
from exporters.errors import ExportError, ExportOptionError, UnsupportedModel
from exporters.graph_fusion import fuse_matmulnbits_siblings
from exporters.int4_recipe import Int4Recipe
from edge_agent.bundle.format import LAST_LOGITS_GRAPH
from exporters.onnx_graph import align_local_attention, layer_windows, write_last_logits_graph

log = logging.getLogger(__name__)

# Text-only decoders the 0.15.2 builder turns into a single decoder graph.
ARCHITECTURES = frozenset({
    "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
    "Phi3ForCausalLM", "PhiForCausalLM", "GemmaForCausalLM", "Gemma2ForCausalLM",
    "Gemma3ForCausalLM", "GraniteForCausalLM", "OlmoForCausalLM", "NemotronForCausalLM",
    "SmolLM3ForCausalLM", "InternLM2ForCausalLM", "Ernie4_5ForCausalLM",
})
# Copied from the source folder: the builder writes the tokenizer files but not these.
EXTRA_FILES = ("config.json", "generation_config.json")
BUILDER_TIMEOUT_S = 3600


def supports(config: dict) -> bool:
    return bool(set(config.get("architectures") or ()) & ARCHITECTURES)


def build(hf_dir: Path, out_dir: Path, *, precision: str, device: str, context_length: int,
          threads: int, cache_dir: Path, recipe: Int4Recipe | None = None) -> dict | None:
    """Run the builder on ``hf_dir`` into ``out_dir`` and fix up genai_config.json.

    int4 follows ``recipe`` (default ``int4_recipe.DEFAULT``). Returns what the manifest
    records as ``quantization``: the recipe for int4, the builder's int8 scheme for int8,
    None for float precisions.
    """
    config = json.loads((hf_dir / "config.json").read_text())
    if not supports(config):
        raise UnsupportedModel(
            f"the genai builder does not support {config.get('architectures')}"
        )
    quantization, options = _quantization(precision, device, recipe)
    if precision == "int4":
        check_block_size(hf_dir, recipe or int4_recipe.DEFAULT)
    cmd = [
        sys.executable, "-m", "onnxruntime_genai.models.builder",
        "-i", str(hf_dir), "-o", str(out_dir), "-p", precision,
        "-e", "cuda" if device == "cuda" else "cpu", "-c", str(cache_dir),
    ]
    if options:
        cmd += ["--extra_options", *(f"{k}={v}" for k, v in options.items())]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    log.info("running the genai builder", extra={"cmd": cmd})
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True,
                              timeout=BUILDER_TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        raise ExportError(f"the genai builder did not finish in {BUILDER_TIMEOUT_S} s") from exc
    if proc.returncode != 0:
        tail = _last_error_line(proc.stderr + proc.stdout)
        raise ExportError(f"the genai builder failed (exit {proc.returncode}): {tail}")
    if not (out_dir / "model.onnx").is_file() or not (out_dir / "genai_config.json").is_file():
        raise ExportError("the genai builder finished but wrote no model.onnx/genai_config.json")
    for name in EXTRA_FILES:
        if (hf_dir / name).is_file() and not (out_dir / name).exists():
            shutil.copy2(hf_dir / name, out_dir / name)
    set_runtime_options(out_dir / "genai_config.json", context_length=context_length,
                        threads=threads)
    repair_tied_int8_embedding(out_dir / "model.onnx")
    repair_int8_shared_gather(out_dir / "model.onnx")
    moved = align_local_attention(out_dir / "model.onnx", layer_windows(hf_dir))
    if moved:
        log.info("moved sliding windows onto the layers transformers makes local",
                 extra={"layers": moved})
    if device == "cpu":
        fuse_matmulnbits_siblings(out_dir / "model.onnx")
        # what the agent's CPU engine runs (edge_agent.engine.batch); GPUs use model.onnx
        write_last_logits_graph(out_dir / "model.onnx", out_dir / LAST_LOGITS_GRAPH)
    return quantization


def repair_tied_int8_embedding(model_path: Path) -> bool:
    """Point a tied int8 embedding at the lm_head tensors the builder actually wrote.

    With tied embeddings the builder's embedding (GatherBlockQuantized) reads the quantized
    lm_head. For ``algo_config=default`` with an int8 lm_head, 0.15.2 names those inputs as
    its RTN pass would (``lm_head.MatMul.weight_Q8G32``, ``..._scale``) while its MLAS pass
    wrote ``..._Q8`` and ``..._scales``, and onnxruntime refuses the graph. The data are the
    ones meant (uint8 offset by 128, GatherBlockQuantized's default zero point for 8 bits):
    only the names are rewired. Returns whether anything was.
    """
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    have = {t.name for t in model.graph.initializer}
    base = "lm_head.MatMul.weight"
    changed = False
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            if name in have or not name.startswith(base):
                continue
            if re.fullmatch(re.escape(base) + r"_Q(\d+)G\d+", name):
                wanted = name[:name.rindex("G")]
            elif name == base + "_scale":
                wanted = base + "_scales"
            else:
                continue
            if wanted in have:
                node.input[i] = wanted
                changed = True
    if changed:
        onnx.save(model, str(model_path))  # the external data file is left as it is
        log.info("rewired the tied int8 embedding's inputs", extra={"model": str(model_path)})
    return changed


def repair_int8_shared_gather(model_path: Path) -> bool:
    """Let an int8 export's tied embedding read the int8 lm_head it shares.

    0.15.2's ``-p int8`` writes the lm_head as 8-bit MatMulNBits (``..._Q8``) but builds the
    embedding as if it were 4-bit: a Reshape of ``..._Q4`` (absent) to ``[vocab, hidden / 2]``
    and a 4-bit GatherBlockQuantized. Reading ``..._Q8`` as ``[vocab, hidden]`` with
    ``bits=8`` is what was meant (zero point 128 for both ops). Returns whether it rewired.
    """
    import numpy as np
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(model_path), load_external_data=False)
    dims = {t.name: list(t.dims) for t in model.graph.initializer}
    base = "lm_head.MatMul.weight"
    q4, q8 = base + "_Q4", base + "_Q8"
    if q4 in dims or q8 not in dims:
        return False
    vocab, blocks, block = dims[q8]
    reshaped, old_shapes = [], set()
    for node in model.graph.node:
        if node.op_type == "Reshape" and node.input[0] == q4:
            shape = f"{base}_int8_embedding_shape"
            model.graph.initializer.append(numpy_helper.from_array(
                np.array([vocab, blocks * block], dtype=np.int64), shape))
            old_shapes.add(node.input[1])
            node.input[0], node.input[1] = q8, shape
            reshaped.append(node.output[0])
    # the 4-bit shape, an initializer or a Constant node: else onnxruntime warns at each load
    unused = old_shapes - {name for node in model.graph.node for name in node.input}
    for init in [t for t in model.graph.initializer if t.name in unused]:
        model.graph.initializer.remove(init)
    for node in [n for n in model.graph.node if n.op_type == "Constant" and n.output[0] in unused]:
        model.graph.node.remove(node)
    for info in [v for v in model.graph.value_info if v.name in reshaped]:
        model.graph.value_info.remove(info)  # the 4-bit shape it recorded
    for node in model.graph.node:
        if node.op_type == "GatherBlockQuantized" and node.input[0] in reshaped:
            for attr in node.attribute:
                if attr.name == "bits":
                    attr.i = 8
    if reshaped:
        onnx.save(model, str(model_path))  # the external data file is left as it is
    return bool(reshaped)


def check_block_size(hf_dir: Path, recipe: Int4Recipe) -> None:
    """Refuse, before the builder runs, a block size it would fail on for this model.

    - Tied embeddings: the embedding is a GatherBlockQuantized over the quantized lm_head,
      reshaped to ``[vocab, hidden * bits / 8]``; when the block size does not divide the
      hidden size the lm_head's blocks are padded and that Reshape fails at the first run
      (SmolLM2-135M: hidden 576, block 128).
    - Zero points written by onnxruntime's Python quantizers (k-quant; rtn_inc asymmetric)
      are packed two blocks to a byte across rows, then reshaped per row: a row of an odd
      number of blocks fails inside the builder (SmolLM2: K 576, block 64, 9 blocks).
    """
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(hf_dir)
    text = getattr(config, "text_config", None) or config
    hidden = getattr(text, "hidden_size", None)
    bs = recipe.block_size
    if getattr(config, "tie_word_embeddings", False) and hidden and hidden % bs:
        raise ExportOptionError(
            f"int4 block_size {bs} does not divide this model's hidden size {hidden}, which "
            f"its tied embedding needs (the genai builder pads the blocks and cannot read "
            f"them back): use a block size that divides {hidden}")
    if recipe.method == "k_quant" or (recipe.method == "rtn_inc" and not recipe.symmetric):
        heads = getattr(text, "num_attention_heads", 0) or 0
        head_dim = getattr(text, "head_dim", None) or (hidden // heads if heads else 0)
        ks = {hidden, getattr(text, "intermediate_size", None), heads * head_dim} - {None, 0}
        odd = sorted(k for k in ks if -(-k // bs) % 2)
        if odd:
            raise ExportOptionError(
                f"int4 {recipe.method} with block_size {bs}: a weight row of K={odd[0]} is "
                f"{-(-odd[0] // bs)} blocks, an odd count that onnxruntime's zero-point packing "
                f"cannot reshape; use a block size giving an even count")


def _quantization(precision: str, device: str,
                  recipe: Int4Recipe | None) -> tuple[dict | None, dict[str, str]]:
    """(the manifest's ``quantization``, the builder's ``--extra_options``) for a precision."""
    if precision == "int4":
        recipe = recipe or int4_recipe.DEFAULT
        return ({**recipe.as_manifest(device), "builder_extra_options":
                 recipe.builder_options(device)}, recipe.builder_options(device))
    if precision == "int8":  # the builder's defaults, recorded as such
        return ({"weights": "int8", "method": "rtn", "block_size": 32,
                 "accuracy_level": 4 if device == "cpu" else 0, "symmetric": True}, {})
    return None, {}


def set_runtime_options(path: Path, *, context_length: int, threads: int) -> None:
    """Write the context length and an explicit thread count into genai_config.json.

    Left unset, onnxruntime-genai's intra-op thread pool ran ~40 % slower on 2 cores here;
    the agent overrides the count from its own ``--threads``.
    """
    cfg = json.loads(path.read_text())
    cfg["model"]["context_length"] = context_length
    cfg["search"]["max_length"] = context_length
    opts = cfg["model"]["decoder"].setdefault("session_options", {})
    opts["intra_op_num_threads"] = threads
    path.write_text(json.dumps(cfg, indent=4) + "\n")


def _last_error_line(text: str) -> str:
    lines = [ln.strip() for ln in text.replace("\r", "\n").splitlines() if ln.strip()]
    for ln in reversed(lines):
        if "Error" in ln or "error" in ln:
            return ln[:400]
    return lines[-1][:400] if lines else "no output"
