"""Engine selection and device checks."""

from __future__ import annotations

import pytest

from edge_agent.engine.ort import providers_for
from edge_agent.errors import DeviceUnavailable


def test_cpu_is_always_available():
    assert providers_for("cpu") == ["CPUExecutionProvider"]


@pytest.mark.parametrize("device", ["cuda", "tensorrt"])
def test_absent_gpu_provider_is_a_clear_error(device):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this machine has a GPU build of onnxruntime")
    with pytest.raises(DeviceUnavailable, match=device):
        providers_for(device)










def test_the_tokenizer_encodes_the_text_alone_whatever_tokenizer_json_says(bpe_tokenizer_dir,
                                                                            tmp_path):
    """all-MiniLM-L6-v2's tokenizer.json pads every input to 128 tokens and truncates; the
    agent must see the text's own tokens (padding pooled as text gave cosines of 0.22)."""
    from types import SimpleNamespace

    from tokenizers import Tokenizer

    from edge_agent.engine.base import load_tokenizer

    padded = Tokenizer.from_file(str(bpe_tokenizer_dir / "tokenizer.json"))
    padded.enable_padding(length=128)
    padded.enable_truncation(max_length=4)
    padded.save(str(tmp_path / "tokenizer.json"))
    bundle = SimpleNamespace(path=tmp_path, has_file=lambda name: True,
                             file=lambda name: tmp_path / name)
    text = "the end of the story is near"
    plain = Tokenizer.from_file(str(bpe_tokenizer_dir / "tokenizer.json")).encode(text).ids
    assert len(padded.encode(text).ids) == 128  # what the file alone would do: pad
    assert load_tokenizer(bundle).encode(text).ids == plain


def test_a_session_that_fell_back_to_the_cpu_is_refused(tmp_path):
    """onnxruntime runs on the CPU when the GPU provider asked for cannot start; the agent
    must not serve a GPU node's traffic that way without a word."""
    import onnx
    from onnx import TensorProto, helper

    from edge_agent.engine.ort import open_session

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])], "identity",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    path = tmp_path / "identity.onnx"
    onnx.save(helper.make_model(graph), str(path))
    assert open_session(str(path), providers=["CPUExecutionProvider"], threads=1)
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        return  # a GPU build starts CUDA here or fails for a reason of its own
    with pytest.raises(DeviceUnavailable, match="could not start CUDAExecutionProvider"):
        open_session(str(path), providers=["CUDAExecutionProvider", "CPUExecutionProvider"],
                     threads=1)

