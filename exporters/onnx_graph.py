"""Run an exported graph with plain onnxruntime and describe its signature.

Both export paths write graphs that take the whole sequence with an empty KV cache, so
validation needs no generation loop: ``input_ids`` [1, S], an all-ones ``attention_mask``,
``position_ids`` 0..S-1 when the graph asks for them, and every ``past_key_values.*`` input
with a past length of 0. This module is the exporters' one user of onnxruntime; its errors
become :class:`ValidationFailed`.
"""

from __future__ import annotations

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
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own untyped errors
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
        except Exception as exc:  # noqa: BLE001
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
