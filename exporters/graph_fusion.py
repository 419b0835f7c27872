"""Horizontal fusion of MatMulNBits siblings, for graphs that run on the CPU provider.

The genai builder already packs q, k and v into one MatMulNBits, but it quantizes each
decoder layer's ``gate_proj`` and ``up_proj`` as two MatMulNBits nodes that read the same
activation. On the CPU provider each MatMulNBits call has a fixed cost (a thread-pool
dispatch, and quantizing the activation to int8 at accuracy_level 4) of a few microseconds,
which at batch 1 is a visible share of a SmolLM2-135M decode step (~5 ms, ~400 kernels).
One node with the two weight matrices stacked along N, followed by a ``Split``, computes the
same numbers: every output column is the same blockwise dot product over K, so the outputs
are bit-identical (tests/exporters/test_graph_fusion.py), and SmolLM2 int4 decodes ~4 %
faster (benchmarks/README.md).

Only CPU exports are fused. onnxruntime's WebGPU provider fuses a separate gate/up pair into
its own ``MatMulNBitsMlp`` kernel, which a stacked node would hide from it, and the CUDA
build of the graph was not measured.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

_MS_DOMAIN = "com.microsoft"


def fuse_matmulnbits_siblings(model_path: Path) -> int:
    """Rewrite ``model_path`` (and its external data file) in place; return the fusions made."""
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    groups = _sibling_groups(model.graph)
    if not groups:
        return 0  # decided from the graph alone: an fp32 model's weights are never read
    data_files = sorted({entry.value for tensor in model.graph.initializer
                         for entry in tensor.external_data if entry.key == "location"})
    onnx.load_external_data_for_model(model, str(model_path.parent))
    _stack(model.graph, groups)
    mode = model_path.stat().st_mode & 0o777
    for name in data_files:
        # onnx appends to an existing external data file; the tensors are in memory now
        (model_path.parent / name).unlink(missing_ok=True)
    location = data_files[0] if len(data_files) == 1 else model_path.name + ".data"
    onnx.save(model, str(model_path), save_as_external_data=True,
              all_tensors_to_one_file=True, location=location)
    (model_path.parent / location).chmod(mode)  # onnx creates it owner-only
    log.info("fused MatMulNBits siblings", extra={"groups": len(groups),
                                                  "model": str(model_path)})
    return len(groups)


def _sibling_groups(graph) -> list[list]:
    """MatMulNBits nodes that can be stacked, in groups of two or more, in graph order."""
    inits = {t.name: t for t in graph.initializer}
    groups: dict[tuple, list] = defaultdict(list)
    for node in graph.node:
        key = _sibling_key(node, inits)
        if key is not None:
            groups[key].append(node)
    return [nodes for nodes in groups.values() if len(nodes) > 1]


def _stack(graph, groups: list[list]) -> None:
    """Replace each group by one MatMulNBits at its first member's place, then a Split."""
    from onnx import helper, numpy_helper

    inits = {t.name: t for t in graph.initializer}
    merges = {id(nodes[0]): nodes for nodes in groups}
    dropped = {id(n) for nodes in groups for n in nodes[1:]}
    new_nodes = []
    for node in graph.node:
        if id(node) in dropped:
            continue
        if id(node) not in merges:
            new_nodes.append(node)
            continue
        nodes = merges[id(node)]
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        widths = [_attr(n, "N") for n in nodes]
        name = node.name + "/fused_siblings"
        stacked = []
        for slot in range(1, len(node.input)):  # B, scales[, zero_points]
            arrays = [numpy_helper.to_array(inits[n.input[slot]]) for n in nodes]
            # N is the leading axis of B, scales and zero_points
            tensor = numpy_helper.from_array(np.concatenate(arrays), f"{name}.input{slot}")
            graph.initializer.append(tensor)
            stacked.append(tensor.name)
        split = numpy_helper.from_array(np.array(widths, dtype=np.int64), f"{name}.split")
        graph.initializer.append(split)
        attrs["N"] = sum(widths)
        new_nodes.append(helper.make_node(
            "MatMulNBits", [node.input[0], *stacked], [f"{name}/output_0"], name=name,
            domain=_MS_DOMAIN, **attrs))
        new_nodes.append(helper.make_node(
            "Split", [f"{name}/output_0", split.name], [n.output[0] for n in nodes],
            name=f"{name}/split", axis=-1))
    del graph.node[:]
    graph.node.extend(new_nodes)
    used = {i for n in graph.node for i in n.input}
    kept = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)


def _sibling_key(node, inits) -> tuple | None:
    """Nodes with equal keys read the same activation with the same quantization layout."""
    if node.op_type != "MatMulNBits" or node.domain != _MS_DOMAIN:
        return None
    # A, B, scales and optionally zero_points, all constant: g_idx or a bias is not stacked
    if not 3 <= len(node.input) <= 4 or not all(node.input[1:]):
        return None
    if not all(name in inits for name in node.input[1:]) or len(node.output) != 1:
        return None
    if len(node.input) == 4 and len(inits[node.input[3]].dims) != 2:
        return None  # 1-D packed zero points do not stack row by row
    attrs = tuple(sorted((a.name, a.i) for a in node.attribute if a.name != "N"))
    dtypes = tuple(inits[name].data_type for name in node.input[1:])
    return (node.input[0], attrs, dtypes)


def _attr(node, name: str) -> int:
    return next(a.i for a in node.attribute if a.name == name)
