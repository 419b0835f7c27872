"""Stacking MatMulNBits siblings: same outputs to the bit, fewer kernels, one data file."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from exporters.graph_fusion import fuse_matmulnbits_siblings

K, BLOCK = 96, 32


def quantized(name: str, n: int, rng, *, zero_points: bool = False) -> list:
    blocks = K // BLOCK
    tensors = [
        numpy_helper.from_array(rng.integers(0, 256, (n, blocks, BLOCK // 2), dtype=np.uint8),
                                f"{name}.B"),
        numpy_helper.from_array(rng.uniform(0.01, 0.1, (n, blocks)).astype(np.float32),
                                f"{name}.scales"),
    ]
    if zero_points:
        tensors.append(numpy_helper.from_array(
            rng.integers(0, 256, (n, (blocks + 1) // 2), dtype=np.uint8), f"{name}.zp"))
    return tensors


def matmul(name: str, a: str, n: int, inits: list, accuracy_level: int = 4) -> onnx.NodeProto:
    return helper.make_node("MatMulNBits", [a, *(t.name for t in inits)], [f"{name}.out"],
                            name=name, domain="com.microsoft", K=K, N=n, bits=4,
                            block_size=BLOCK, accuracy_level=accuracy_level)


def write_model(path, rng):
    """gate and up read `a` (fused); `zp_a`/`zp_b` read `b` with zero points (fused); `lone`
    reads `a` at accuracy level 0 (a different layout: left alone)."""
    specs = [("gate", "a", 64, False), ("up", "a", 160, False),
             ("zp_a", "b", 32, True), ("zp_b", "b", 48, True)]
    nodes, inits, outputs = [], [], []
    for name, src, n, zp in specs:
        t = quantized(name, n, rng, zero_points=zp)
        inits += t
        nodes.append(matmul(name, src, n, t))
        outputs.append(helper.make_tensor_value_info(f"{name}.out", TensorProto.FLOAT, None))
    t = quantized("lone", 64, rng)
    inits += t
    nodes.append(matmul("lone", "a", 64, t, accuracy_level=0))
    outputs.append(helper.make_tensor_value_info("lone.out", TensorProto.FLOAT, None))
    inputs = [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["batch", "seq", K])
              for x in ("a", "b")]
    model = helper.make_model(
        helper.make_graph(nodes, "siblings", inputs, outputs, inits),
        opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    onnx.save(model, str(path), save_as_external_data=True, location="model.onnx.data",
              size_threshold=0)


def run(path, feeds: dict) -> list[np.ndarray]:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


@pytest.fixture
def model_path(tmp_path):
    path = tmp_path / "model.onnx"
    write_model(path, np.random.default_rng(0))
    return path


def test_fused_graph_gives_bit_identical_outputs(model_path):
    rng = np.random.default_rng(1)
    cases = [{x: rng.standard_normal((1, seq, K)).astype(np.float32) for x in ("a", "b")}
             for seq in (1, 7)]  # a decode step and a prefill
    before = [run(model_path, feeds) for feeds in cases]
    data_size = (model_path.parent / "model.onnx.data").stat().st_size

    assert fuse_matmulnbits_siblings(model_path) == 2

    graph = onnx.load(str(model_path), load_external_data=False).graph
    matmuls = [n for n in graph.node if n.op_type == "MatMulNBits"]
    assert sorted(next(a.i for a in n.attribute if a.name == "N") for n in matmuls) \
        == [64, 80, 224]  # lone, zp_a+zp_b, gate+up
    assert [n.op_type for n in graph.node].count("Split") == 2
    # the old tensors are gone from the data file, not appended to
    assert sorted(p.name for p in model_path.parent.iterdir()) == ["model.onnx",
                                                                    "model.onnx.data"]
    assert (model_path.parent / "model.onnx.data").stat().st_size <= data_size + 64
    for feeds, expected in zip(cases, before):
        for got, want in zip(run(model_path, feeds), expected):
            assert got.shape == want.shape
            np.testing.assert_array_equal(got, want)


def test_a_graph_without_siblings_is_left_untouched(tmp_path):
    rng = np.random.default_rng(2)
    t = quantized("only", 64, rng)
    model = helper.make_model(helper.make_graph(
        [matmul("only", "a", 64, t)], "one",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [1, 1, K])],
        [helper.make_tensor_value_info("only.out", TensorProto.FLOAT, None)], t),
        opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    path = tmp_path / "model.onnx"
    onnx.save(model, str(path), save_as_external_data=True, location="model.onnx.data",
              size_threshold=0)
    stamp = path.stat().st_mtime_ns, (tmp_path / "model.onnx.data").stat().st_mtime_ns
    assert fuse_matmulnbits_siblings(path) == 0
    assert (path.stat().st_mtime_ns, (tmp_path / "model.onnx.data").stat().st_mtime_ns) == stamp
