"""The attention layout of builder graphs: which layers the model's config makes local, which
the graph does, and the repair that makes them agree (``exporters.onnx_graph``). The graphs
here are small stand-ins with the builder's node names; tests/e2e/test_architectures.py runs
the real builder."""

import onnx
import pytest
from onnx import TensorProto, helper

from exporters.onnx_graph import (
    GLOBAL,
    align_local_attention,
    attention_windows,
    layer_windows,
)


def builder_like_graph(path, windows: list[int], rotary: tuple[str, ...] = ("",)):
    """One GroupQueryAttention per layer, named as onnxruntime-genai's builder names them,
    reading ``cos_cache{suffix}``/``sin_cache{suffix}``: ``_local`` for a local layer when
    the graph has separate local and global caches."""
    inits = [helper.make_tensor(f"{kind}_cache{suffix}", TensorProto.FLOAT, [1], [0.0])
             for kind in ("cos", "sin") for suffix in rotary]
    nodes = []
    for i, window in enumerate(windows):
        suffix = "" if rotary == ("",) else ("_local" if window != GLOBAL else "_global")
        nodes.append(helper.make_node(
            "GroupQueryAttention",
            [f"q{i}", "", "", f"past_key_values.{i}.key", f"past_key_values.{i}.value",
             "seqlens_k", "total_seq_len", f"cos_cache{suffix}", f"sin_cache{suffix}"],
            [f"out{i}", f"present.{i}.key", f"present.{i}.value"],
            name=f"/model/layers.{i}/attn/GroupQueryAttention", domain="com.microsoft",
            num_heads=4, kv_num_heads=2, local_window_size=window))
    graph = helper.make_graph(nodes, "g", [], [], initializer=inits)
    onnx.save(helper.make_model(graph), str(path))
    return path


def cos_inputs(path) -> list[str]:
    model = onnx.load(str(path))
    return [n.input[7] for n in model.graph.node]


def test_a_window_on_the_wrong_layer_is_moved(tmp_path):
    """The 0.15.2 builder's Gemma 2: local odd layers, where transformers has the even ones."""
    path = builder_like_graph(tmp_path / "model.onnx", [GLOBAL, 16, GLOBAL, 16])
    assert align_local_attention(path, [16, GLOBAL, 16, GLOBAL]) == [0, 1, 2, 3]
    assert attention_windows(path) == {0: 16, 1: GLOBAL, 2: 16, 3: GLOBAL}
    assert align_local_attention(path, [16, GLOBAL, 16, GLOBAL]) == []  # now it agrees


def test_a_layer_that_changes_kind_reads_its_kinds_rotary_cache(tmp_path):
    """Gemma 3 keeps a rope cache per kind of layer (rope_local_base_freq for local ones)."""
    path = builder_like_graph(tmp_path / "model.onnx", [16, 16, GLOBAL],
                              rotary=("_local", "_global"))
    assert align_local_attention(path, [16, GLOBAL, 16]) == [1, 2]
    assert cos_inputs(path) == ["cos_cache_local", "cos_cache_global", "cos_cache_local"]


def test_nothing_is_rewritten_without_per_layer_types(tmp_path):
    path = builder_like_graph(tmp_path / "model.onnx", [16, 16])
    before = path.read_bytes()
    assert align_local_attention(path, None) == []
    assert align_local_attention(path, [None, None]) == []  # kinds it does not know: kept
    assert path.read_bytes() == before


@pytest.mark.parametrize("config, expected", [
    ({"model_type": "gemma2", "num_hidden_layers": 4, "sliding_window": 16},
     [16, GLOBAL, 16, GLOBAL]),
    ({"model_type": "gemma3_text", "num_hidden_layers": 7, "sliding_window": 8},
     [8, 8, 8, 8, 8, GLOBAL, 8]),
    ({"model_type": "gemma3_text", "num_hidden_layers": 2, "sliding_window": 8,
      "layer_types": ["full_attention", "sliding_attention"]}, [GLOBAL, 8]),
    ({"model_type": "qwen2", "num_hidden_layers": 2, "sliding_window": 4096,
      "use_sliding_window": False}, None),
    ({"model_type": "mistral", "num_hidden_layers": 2, "sliding_window": 16}, None),
    ({"model_type": "llama", "num_hidden_layers": 2}, None),
])
def test_layer_windows_as_transformers_reads_the_config(config, expected, tmp_path):
    import json

    (tmp_path / "config.json").write_text(json.dumps(config))
    assert layer_windows(tmp_path) == expected


def test_the_last_logits_graph_gives_the_full_graphs_last_row_bit_for_bit(tiny_genai_bundle):
    import json

    import numpy as np
    import onnxruntime as ort

    from edge_agent.bundle.format import LAST_LOGITS_GRAPH
    from edge_agent.engine.batch import BatchEngine

    assert tiny_genai_bundle.has_file(LAST_LOGITS_GRAPH)   # written by the genai CPU export
    sessions = [ort.InferenceSession(str(tiny_genai_bundle.file(name)),
                                     providers=["CPUExecutionProvider"])
                for name in ("model.onnx", LAST_LOGITS_GRAPH)]
    feeds = {"input_ids": np.arange(100, 140, dtype=np.int64)[None],
             "attention_mask": np.ones((1, 40), dtype=np.int64)}
    genai = json.loads(tiny_genai_bundle.file("genai_config.json").read_text())["model"]
    heads, size = genai["decoder"]["num_key_value_heads"], genai["decoder"]["head_size"]
    for i in sessions[0].get_inputs():
        if i.name.startswith("past_key_values."):
            feeds[i.name] = np.zeros((1, heads, 0, size), dtype=np.float32)
    full, last = (s.run(["logits"], feeds)[0] for s in sessions)
    assert full.shape[1] == 40 and last.shape[1] == 1
    assert np.array_equal(full[:, -1], last[:, 0])
    engine = BatchEngine(tiny_genai_bundle, threads=1)
    try:
        assert engine.last_only   # the agent's CPU engine runs it
    finally:
        engine.close()
