"""Weight quantization of optimum-exported graphs with onnxruntime's quantizers.

int8: dynamic quantization (int8 weights in a 7-bit range, activations quantized per call)
after ``quant_pre_process``. Without the pre-processing pass the lm_head of a model with tied
embeddings reaches MatMul through a Transpose of the embedding table, the quantizer does
not see a constant weight, and the largest matrix of a small LLM stays fp32.
int4: blockwise weight-only quantization to MatMulNBits (onnxruntime's kernel for it is
the one the genai int4 graphs use too); the quantizer needs the ``onnx-ir`` package.
"""

from __future__ import annotations

import logging
import re
from dataclasses import replace
from pathlib import Path

from exporters import int4_recipe
from exporters.errors import ExportError
from exporters.int4_recipe import Int4Recipe

log = logging.getLogger(__name__)

# Node-name fragments of MLP output projections across common architectures.
OUTLIER_MATMULS = ("down_proj", "/fc2/", "/mlp/c_proj", "dense_4h_to_h", "/output/dense")


def quantize_int8(src: Path, dest: Path) -> dict:
    """Dynamic int8 of ``src`` into ``dest``; return the manifest's ``quantization``."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = src.with_name("preprocessed.onnx")
    kept: list[str] = []
    try:
        # Symbolic shape inference trips on the KV-cache graphs' dynamic dims; ONNX shape
        # inference plus the optimizer (which folds the lm_head Transpose) is what matters.
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True,
                          save_as_external_data=True, all_tensors_to_one_file=True,
                          external_data_location=pre.name + ".data")
        kept = _outlier_matmuls(pre)
        # reduce_range: 7-bit weights. x86 CPUs without VNNI (AVX2, plain AVX-512) multiply
        # uint8 activations by int8 weights with VPMADDUBSW, whose 16-bit pair sums saturate
        # at full-range weights: SmolLM2's int8 read perplexity 3121 against 27 on an AVX2
        # EPYC. Within [-64, 64] no pair can overflow (2 x 255 x 64 = 32640), on any CPU.
        quantize_dynamic(str(pre), str(dest), weight_type=QuantType.QInt8, per_channel=True,
                         reduce_range=True, op_types_to_quantize=["MatMul", "Gemm"],
                         nodes_to_exclude=kept, use_external_data_format=True)
    except Exception as exc:
        raise ExportError(f"int8 quantization failed: {exc}") from exc
    finally:
        for p in src.parent.glob("preprocessed.onnx*"):
            p.unlink()
    return {"weights": "int8", "method": "dynamic", "per_channel": True, "reduce_range": True,
            "kept_fp32": kept}


def _outlier_matmuls(path: Path) -> list[str]:
    """MatMuls fed by the MLP's activations, left in fp32.

    Dynamic quantization scales each activation tensor with one per-call range; the input of
    an MLP's down projection has a few huge outlier channels (the LLM.int8() observation), so
    one range crushes every other channel. Measured on SmolLM2-135M against fp32: all MatMuls
    int8 cost +60 % perplexity and 69 % teacher-forced agreement; the same with the 30
    down_proj MatMuls kept fp32 cost +8 % and 89 %, with the lm_head still int8.
    """
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return [n.name for n in model.graph.node
            if n.op_type in ("MatMul", "Gemm") and any(k in n.name for k in OUTLIER_MATMULS)]


def quantize_int4(src: Path, dest: Path, recipe: Int4Recipe | None = None) -> dict:
    """Quantize ``src``'s constant MatMuls to MatMulNBits as ``recipe`` says (default
    ``int4_recipe.DEFAULT``); return the manifest's ``quantization`` record."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    recipe = (recipe or int4_recipe.DEFAULT).for_device("cpu")
    try:
        model = onnx.load(str(src), load_external_data=True)
        last, constant = _lm_head(model)
        if not constant:  # a tied lm_head reads the embedding through a Transpose: stays fp32
            recipe, last = replace(recipe, lm_head="fp32"), None
        sensitive = _sensitive_matmuls(model) if recipe.sensitive_layers == "int8" else []
        for pass_args in _int4_passes(recipe, last, sensitive):
            q = MatMulNBitsQuantizer(model, block_size=recipe.block_size,
                                     is_symmetric=recipe.symmetric,
                                     accuracy_level=recipe.accuracy_level, **pass_args)
            q.process()
            model = q.model.model
        q.model.save_model_to_file(str(dest), use_external_data_format=True)
    except Exception as exc:
        raise ExportError(f"int4 quantization failed: {exc}") from exc
    return recipe.as_manifest("cpu")


def _int4_passes(recipe: Int4Recipe, last: str | None, sensitive: list[str]) -> list[dict]:
    """MatMulNBitsQuantizer arguments, one dict per pass, for ``recipe``: ``last`` is the
    lm_head's node (None: left as it is), ``sensitive`` the nodes promoted to int8.

    RTN-inc and k-quant take per-node bits in one pass; onnxruntime's own round-to-nearest
    takes one bit width per pass, so the int8 nodes are a second pass over those nodes alone
    (as the genai builder does it).
    """
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        KQuantWeightOnlyQuantConfig,
        RTNWeightOnlyQuantConfig,
    )

    fp32 = [last] if last and recipe.lm_head == "fp32" else []
    int8 = list(sensitive) + ([last] if last and recipe.lm_head == "int8" else [])
    if recipe.method != "rtn":
        config = RTNWeightOnlyQuantConfig if recipe.method == "rtn_inc" \
            else KQuantWeightOnlyQuantConfig
        custom = {name: {"bits": 8} for name in int8}
        return [{"bits": 4, "algo_config": config(customized_weight_config=custom),
                 "nodes_to_exclude": fp32}]
    passes = [{"bits": 4, "nodes_to_exclude": fp32 + int8}]
    if int8:
        passes.append({"bits": 8, "nodes_to_include": int8, "nodes_to_exclude": fp32})
    return passes


def _sensitive_matmuls(model) -> list[str]:
    """The attention v and MLP down projections of ``int4_recipe.sensitive_layers``."""
    layer_of = {}
    for node in model.graph.node:
        match = re.search(r"/layers\.(\d+)/", node.name)
        if match:
            layer_of[node.name] = int(match.group(1))
    if not layer_of:
        return []
    chosen = set(int4_recipe.sensitive_layers(max(layer_of.values()) + 1))
    return [node.name for node in model.graph.node
            if node.op_type == "MatMul" and layer_of.get(node.name) in chosen
            and re.search(r"(v_proj|down_proj)/MatMul$", node.name)]


def _lm_head(model) -> tuple[str | None, bool]:
    """(name, weight is a constant) of the MatMul nearest the first graph output (logits)."""
    from collections import deque

    producers = {out: n for n in model.graph.node for out in n.output}
    inits = {t.name for t in model.graph.initializer}
    queue, seen = deque([model.graph.output[0].name]), set()
    while queue:
        node = producers.get(queue.popleft())
        if node is None or node.name in seen:
            continue
        seen.add(node.name)
        if node.op_type == "MatMul":
            return node.name, len(node.input) > 1 and node.input[1] in inits
        queue.extend(node.input)
    return None, False
