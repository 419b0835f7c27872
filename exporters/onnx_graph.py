"""Run an exported graph with plain onnxruntime and describe its signature.

Both export paths write graphs that take the whole sequence with an empty KV cache, so
validation needs no generation loop: ``input_ids`` [1, S], an all-ones ``attention_mask``,
``position_ids`` 0..S-1 when the graph asks for them, and every ``past_key_values.*`` input
with a past length of 0. This module is the exporters' one user of onnxruntime; its errors
become :class:`ValidationFailed`.

It also reads and mends the attention layout of a builder graph: ``layer_windows`` is what the
model's config says each layer attends to, ``attention_windows`` what the graph does, and
``align_local_attention`` makes the graph say what the config says; and it writes the
last-position variant of a decoder (``write_last_logits_graph``).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from exporters.errors import ValidationFailed

_ORT_DTYPES = {
    "tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
    "tensor(int32)": np.int32, "tensor(bool)": np.bool_,
}
_DTYPE_NAMES = {
    "tensor(float)": "float32", "tensor(float16)": "float16", "tensor(int64)": "int64",
    "tensor(int32)": "int32", "tensor(bool)": "bool", "tensor(bfloat16)": "bfloat16",
}


class Graph:
    """An ONNX model file loaded in an onnxruntime CPU session."""

    def __init__(self, path: Path, *, threads: int | None = None):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        opts.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(path), opts,
                                                providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise ValidationFailed(f"onnxruntime cannot load {path.name}: {exc}") from exc
        self.inputs = self.session.get_inputs()
        self.outputs = self.session.get_outputs()

    def _feed(self, input_ids: np.ndarray, kv_heads: int, head_dim: int) -> dict:
        seq = input_ids.shape[0]
        feed = {}
        for inp in self.inputs:
            name = inp.name
            dtype = _ORT_DTYPES.get(inp.type, np.float32)
            if name == "input_ids":
                feed[name] = input_ids[None, :].astype(dtype)
            elif name == "attention_mask":
                feed[name] = np.ones((1, seq), dtype=dtype)
            elif name == "position_ids":
                feed[name] = np.arange(seq, dtype=dtype)[None, :]
            elif name == "token_type_ids":
                feed[name] = np.zeros((1, seq), dtype=dtype)
            elif name.startswith("past_key_values"):
                shape = [d if isinstance(d, int) else None for d in inp.shape]
                heads = shape[1] or kv_heads
                dim = shape[3] or head_dim
                feed[name] = np.zeros((1, heads, 0, dim), dtype=dtype)
            else:
                raise ValidationFailed(f"graph input {name!r} is not one edgegen knows how to feed")
        return feed

    def run(self, input_ids: np.ndarray, *, output: str, kv_heads: int = 0,
            head_dim: int = 0) -> np.ndarray:
        """``output`` [S, ...] for one sequence of token ids, read in a single pass."""
        try:
            out = self.session.run([output], self._feed(input_ids, kv_heads, head_dim))[0]
        except Exception as exc:
            raise ValidationFailed(f"the exported graph failed to run: {exc}") from exc
        return np.asarray(out[0], dtype=np.float32)

    def signature(self, config: dict, path: Path) -> dict:
        """The manifest's ``signature``: I/O, opset, and the shapes the runtime needs."""
        import onnx

        model = onnx.load(str(path), load_external_data=False)
        opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")),
                    default=0)
        heads = config.get("num_attention_heads", 0)
        hidden = config.get("hidden_size", 0)
        sig = {
            "inputs": [_io(i) for i in self.inputs],
            "outputs": [_io(o) for o in self.outputs],
            "opset": int(opset),
            "num_layers": int(config.get("num_hidden_layers", 0)),
            "num_attention_heads": int(heads),
            "num_kv_heads": int(config.get("num_key_value_heads", heads)),
            "head_dim": int(config.get("head_dim") or (hidden // heads if heads else 0)),
            "hidden_size": int(hidden),
            "vocab_size": int(config.get("vocab_size", 0)),
        }
        return sig


def _io(arg) -> dict:
    return {"name": arg.name, "dtype": _DTYPE_NAMES.get(arg.type, arg.type),
            "shape": [d if isinstance(d, int) else (d or "?") for d in arg.shape]}


# -- local (sliding-window) attention in builder graphs ---------------------------------------

_LAYER = re.compile(r"/layers\.(\d+)/")
GLOBAL = -1  # GroupQueryAttention's local_window_size for a layer that sees every position


def layer_windows(hf_dir: Path) -> list[int | None] | None:
    """Each layer's sliding window as transformers runs the model (``GLOBAL``: full attention,
    None: some other kind), or None when its config has no per-layer attention types.

    Read through transformers' own config class, which fills ``layer_types`` in where an older
    config.json only has a pattern (Gemma 3's ``sliding_window_pattern``) and drops the window
    where it is switched off (Qwen2's ``use_sliding_window: false``)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(hf_dir).get_text_config()
    types, window = getattr(config, "layer_types", None), getattr(config, "sliding_window", None)
    if not types or not isinstance(window, int):
        return None
    kinds = {"sliding_attention": window, "full_attention": GLOBAL}
    return [kinds.get(kind) for kind in types]


def attention_windows(model) -> dict[int, int]:
    """Layer index -> its GroupQueryAttention's ``local_window_size`` (``model``: a path or an
    ``onnx.ModelProto``); layers without that op are absent."""
    import onnx

    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model), load_external_data=False)
    found = {}
    for node in model.graph.node:
        layer = _LAYER.search(node.name)
        if node.op_type == "GroupQueryAttention" and layer:
            window = next((a.i for a in node.attribute if a.name == "local_window_size"), GLOBAL)
            found[int(layer.group(1))] = int(window)
    return found


def align_local_attention(model_path: Path, windows: list[int | None] | None) -> list[int]:
    """Give each layer's GroupQueryAttention the window ``windows`` (``layer_windows``) names;
    return the layers changed (the graph file is rewritten only if there are any).

    onnxruntime-genai 0.15.2 decides which layers are local by a rule of its own
    (``Gemma2Model.is_local``: the odd layers), while transformers and Google's reference
    make Gemma 2's even layers local: every window sat on the wrong layer. Where the graph
    keeps separate rotary caches for local and global layers (``cos_cache_local`` /
    ``cos_cache_global``, Gemma 3), a layer that changes kind reads the other pair too."""
    import onnx

    if not windows:
        return []
    model = onnx.load(str(model_path), load_external_data=False)
    have = {t.name for t in model.graph.initializer}
    changed = []
    for node in model.graph.node:
        layer = _LAYER.search(node.name)
        if node.op_type != "GroupQueryAttention" or not layer:
            continue
        index = int(layer.group(1))
        want = windows[index] if index < len(windows) else None
        attr = next((a for a in node.attribute if a.name == "local_window_size"), None)
        if want is None or (attr.i if attr is not None else GLOBAL) == want:
            continue
        if attr is None:
            node.attribute.append(onnx.helper.make_attribute("local_window_size", want))
        else:
            attr.i = want
        kind = "global" if want == GLOBAL else "local"
        for slot in (7, 8):  # cos_cache, sin_cache
            if slot < len(node.input):
                base = re.sub(r"_(local|global)$", "", node.input[slot])
                if f"{base}_{kind}" in have:
                    node.input[slot] = f"{base}_{kind}"
        changed.append(index)
    if changed:
        onnx.save(model, str(model_path))  # the external data file is left as it is
    return changed


def write_last_logits_graph(model_path: Path, out_path: Path) -> None:
    """Write beside ``model_path`` the same decoder with its lm_head applied to the last
    position only: logits ``[batch, 1, vocab]`` instead of ``[batch, tokens, vocab]``.

    A prompt needs one row of logits; computing all of them costs ~15 % of a 1k-token
    prefill on SmolLM2 (its 49k-row lm_head) and a ``[tokens, vocab]`` float buffer (200 MB
    for 1k tokens). The lm_head's rows are computed independently, so the last row is bit
    for bit the full graph's (measured). The new graph names the same external data file.
    """
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(model_path), load_external_data=False)
    graph = model.graph
    producer = {out: node for node in graph.node for out in node.output}
    logits = next((o for o in graph.output if o.name == "logits"), None)
    if logits is None or "logits" not in producer:
        raise ValidationFailed(f"{model_path.name} has no logits output to cut")
    head = producer["logits"]
    while head.op_type not in ("MatMul", "MatMulNBits", "Gemm"):  # past Cast / softcap ops
        head = producer.get(head.input[0])
        if head is None:
            raise ValidationFailed(f"{model_path.name}: no lm_head MatMul before the logits")
    graph.initializer.extend([
        numpy_helper.from_array(np.array([-1], np.int64), "edgegen/last_position/starts"),
        numpy_helper.from_array(np.array([np.iinfo(np.int64).max], np.int64),
                                "edgegen/last_position/ends"),
        numpy_helper.from_array(np.array([1], np.int64), "edgegen/last_position/axes"),
    ])
    cut = helper.make_node(
        "Slice", [head.input[0], "edgegen/last_position/starts", "edgegen/last_position/ends",
                  "edgegen/last_position/axes"], ["edgegen/last_position/hidden"],
        name="/edgegen/last_position")
    head.input[0] = "edgegen/last_position/hidden"
    graph.node.insert(list(graph.node).index(head), cut)
    dim = logits.type.tensor_type.shape.dim[1]
    dim.Clear()
    dim.dim_value = 1
    onnx.save(model, str(out_path))  # external data: the same file, left as it is
