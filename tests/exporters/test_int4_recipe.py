"""The int4 recipe: its mapping to the builder's and the quantizer's options, its errors, and
what a real (tiny) int4 export records in its manifest."""

from __future__ import annotations

import json

import onnx
import pytest
from onnx import TensorProto, helper

from exporters import int4_recipe
from exporters.errors import ExportOptionError
from exporters.genai import check_block_size, repair_tied_int8_embedding
from exporters.int4_recipe import Int4Recipe, recipe_for_precision, resolve
from exporters.pipeline import export_model
from exporters.quantize import _int4_passes

THREADS = 2


@pytest.mark.parametrize("name, device, expected", [
    ("rtn-bs32", "cpu", {"algo_config": "default", "block_size": "32", "accuracy_level": "4",
                         "is_symmetric": "true"}),
    ("rtn-bs32", "cuda", {"algo_config": "default", "block_size": "32", "accuracy_level": "0",
                          "is_symmetric": "true"}),
    ("rtn-bs128", "cpu", {"algo_config": "default", "block_size": "128", "accuracy_level": "4",
                          "is_symmetric": "true"}),
    ("rtn-bs32-lmhead8", "cpu", {"algo_config": "default", "block_size": "32",
                                 "accuracy_level": "4", "is_symmetric": "true",
                                 "matmul_mixed_precision": "last_matmul:int8"}),
    ("rtn-bs32-lmhead32", "cpu", {"algo_config": "default", "block_size": "32",
                                  "accuracy_level": "4", "is_symmetric": "true",
                                  "nodes_to_exclude": "/lm_head/MatMul"}),
    ("rtn-bs32-acc1", "cpu", {"algo_config": "default", "block_size": "32",
                              "accuracy_level": "1", "is_symmetric": "true"}),
    ("rtn_inc-bs32", "cpu", {"algo_config": "rtn", "block_size": "32", "accuracy_level": "4",
                             "is_symmetric": "true"}),
    # k-quant writes zero points whatever is_symmetric says: the option is left out
    ("k_quant-bs64", "cpu", {"algo_config": "k_quant", "block_size": "64",
                             "accuracy_level": "4"}),
    ("k_quant-bs32-mixed", "cpu", {"algo_config": "k_quant", "block_size": "32",
                                   "accuracy_level": "4",
                                   "matmul_mixed_precision": "last_matmul:int8,mixed_layers:int8"}),
])
def test_recipe_maps_to_builder_options(name, device, expected):
    assert int4_recipe.NAMED[name].builder_options(device) == expected


def test_default_is_a_named_recipe_and_recorded_resolved():
    assert int4_recipe.NAMED[int4_recipe.DEFAULT_NAME] is int4_recipe.DEFAULT
    record = int4_recipe.DEFAULT.as_manifest("cpu")
    assert record["weights"] == "int4" and record["recipe"] == int4_recipe.DEFAULT_NAME
    assert record["accuracy_level"] == 4  # resolved for the device, never None
    assert int4_recipe.DEFAULT.as_manifest("cuda")["accuracy_level"] == 0


@pytest.mark.parametrize("spec, expected", [
    (None, int4_recipe.DEFAULT),
    ("k_quant-bs32", Int4Recipe(method="k_quant")),
    ("method=k_quant, block_size=64", Int4Recipe(method="k_quant", block_size=64)),
    ("lm_head=int8,accuracy_level=1,symmetric=false",
     Int4Recipe(lm_head="int8", accuracy_level=1, symmetric=False)),
    ({"block_size": 128}, Int4Recipe(block_size=128)),
    (Int4Recipe(block_size=64), Int4Recipe(block_size=64)),
])
def test_resolve(spec, expected):
    assert resolve(spec) == expected


def test_names_of_recipes():
    assert resolve("block_size=64,lm_head=int8").name() == "rtn-bs64-lmhead8"
    assert resolve("block_size=256").name() == "block_size=256"
    assert Int4Recipe(method="k_quant").symmetric is False  # what k-quant writes


@pytest.mark.parametrize("spec, match", [
    ("rtn-bs33", "unknown int4 recipe 'rtn-bs33': use one of rtn-bs32"),
    ("block_size=48", "block_size=48 is not one of 16, 32, 64, 128, 256"),
    ("method=gptq", "method='gptq' is not one of rtn, rtn_inc, k_quant"),
    ("lm_head=int2", "lm_head='int2' is not one of int4, int8, fp32"),
    ("bits=3", "unknown field bits"),
    ("block_size=big", "block_size='big' is not a number"),
    ("symmetric=maybe", "symmetric='maybe' is not true or false"),
    ("method=k_quant,oops", "'oops' is not key=value"),
    ({"accuracy_level": True}, "accuracy_level=True is not one of"),
    (42, "is not a name, key=value text or dict"),
])
def test_bad_recipes_are_one_line_option_errors(spec, match):
    with pytest.raises(ExportOptionError, match=match) as err:
        resolve(spec)
    assert "\n" not in str(err.value)


def test_a_recipe_for_another_precision_is_refused():
    with pytest.raises(ExportOptionError, match="int4 recipe was given for a int8 export"):
        recipe_for_precision("int8", "k_quant-bs32")
    assert recipe_for_precision("int8", None) == int4_recipe.DEFAULT  # unused, harmless


def test_a_bad_recipe_fails_before_any_work(tmp_path):
    with pytest.raises(ExportOptionError, match="unknown int4 recipe"):
        export_model(str(tmp_path / "no-such-model"), int4_recipe="nope", store=tmp_path)
    assert list(tmp_path.iterdir()) == []  # not even a staging directory


def test_optimum_passes():
    """onnxruntime's own RTN takes one bit width per pass; RTN-inc and k-quant one pass."""
    head, v = "/lm_head/MatMul", "/model/layers.0/self_attn/v_proj/MatMul"
    passes = _int4_passes(resolve("rtn-bs32-lmhead8"), head, [])
    assert [p["bits"] for p in passes] == [4, 8]
    assert passes[0]["nodes_to_exclude"] == [head]
    assert passes[1]["nodes_to_include"] == [head]
    (one,) = _int4_passes(resolve("k_quant-bs32-mixed"), head, [v])
    assert one["algo_config"].customized_weight_config == {v: {"bits": 8}, head: {"bits": 8}}
    (fp32,) = _int4_passes(resolve("rtn-bs32-lmhead32"), head, [])
    assert fp32["nodes_to_exclude"] == [head]
    first, second = _int4_passes(resolve("rtn-bs64-mixed"), None, [v])  # lm_head not constant
    assert first["nodes_to_exclude"] == [v] and second["nodes_to_include"] == [v]


@pytest.mark.parametrize("num_layers, expected", [
    (2, [0]),
    (30, [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29]),  # SmolLM2-135M
    (18, [0, 1, 2, 4, 7, 10, 13, 16, 17]),                     # Gemma 3 270M
])
def test_sensitive_layers_are_the_builders(num_layers, expected):
    """The same selection as onnxruntime-genai 0.15.2's ``make_matmul_mixed_precision``."""
    assert int4_recipe.sensitive_layers(num_layers) == expected


def test_tied_int8_embedding_is_rewired(tmp_path):
    """The builder's tied embedding names RTN tensors that its MLAS int8 pass did not write."""
    inits = [helper.make_tensor("lm_head.MatMul.weight_Q8", TensorProto.UINT8, [4, 1, 2],
                                [128] * 8),
             helper.make_tensor("lm_head.MatMul.weight_scales", TensorProto.FLOAT, [4, 1],
                                [1.0] * 4),
             helper.make_tensor("shape", TensorProto.INT64, [2], [4, 2])]
    nodes = [helper.make_node("Reshape", ["lm_head.MatMul.weight_Q8G32", "shape"], ["w"]),
             helper.make_node("GatherBlockQuantized", ["w", "ids", "lm_head.MatMul.weight_scale"],
                              ["out"], domain="com.microsoft", bits=8, block_size=32)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64,
                                                                         [1])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)],
                              inits)
    path = tmp_path / "model.onnx"
    onnx.save(helper.make_model(graph), str(path))
    assert repair_tied_int8_embedding(path) is True
    fixed = onnx.load(str(path)).graph.node
    assert list(fixed[0].input) == ["lm_head.MatMul.weight_Q8", "shape"]
    assert list(fixed[1].input) == ["w", "ids", "lm_head.MatMul.weight_scales"]
    assert repair_tied_int8_embedding(path) is False  # nothing left to do


@pytest.mark.parametrize("tied, recipe, refused", [
    (True, "rtn-bs64", None),
    (True, "rtn-bs128", "block_size 128 does not divide this model's hidden size 576"),
    (False, "rtn-bs128", None),
    (True, "k_quant-bs32", None),
    (True, "k_quant-bs64", "k_quant with block_size 64: a weight row of K=576 is 9 blocks"),
    (False, "method=rtn_inc,block_size=64,symmetric=false", "a weight row of K=576 is 9"),
    (False, "method=rtn_inc,block_size=64", None),   # symmetric: no zero points
])
def test_block_sizes_the_builder_would_fail_on(tmp_path, tied, recipe, refused):
    """SmolLM2's sizes: hidden 576 (4.5 blocks of 128, 9 of 64), intermediate 1536."""
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 576,
        "intermediate_size": 1536, "num_attention_heads": 9, "tie_word_embeddings": tied}))
    if refused:
        with pytest.raises(ExportOptionError, match=refused):
            check_block_size(tmp_path, resolve(recipe))
    else:
        check_block_size(tmp_path, resolve(recipe))


# --- real exports of the tiny llama -----------------------------------------------------------

def _matmulnbits(bundle) -> dict[str, dict]:
    graph = onnx.load(str(bundle.path / "model.onnx"), load_external_data=False).graph
    return {n.name: {a.name: a.i for a in n.attribute} for n in graph.node
            if n.op_type == "MatMulNBits"}


def test_default_int4_export_records_the_default_recipe(tiny_llama_dir, tmp_path):
    b = export_model(str(tiny_llama_dir), precision="int4", exporter="genai", store=tmp_path,
                     threads=THREADS, force=True)
    q = b.manifest["quantization"]
    assert {k: v for k, v in q.items() if k != "builder_extra_options"} \
        == int4_recipe.DEFAULT.as_manifest("cpu")
    assert q["builder_extra_options"] == int4_recipe.DEFAULT.builder_options("cpu")
    nodes = _matmulnbits(b)
    assert {a["block_size"] for a in nodes.values()} == {int4_recipe.DEFAULT.block_size}
    assert {a["accuracy_level"] for a in nodes.values()} == {4}


def test_genai_export_follows_a_chosen_recipe(tiny_llama_dir, tmp_path):
    """An int8 lm_head on the default method (the builder's tied-embedding naming bug)."""
    b = export_model(str(tiny_llama_dir), precision="int4", exporter="genai", store=tmp_path,
                     threads=THREADS, force=True, int4_recipe="rtn-bs64-lmhead8")
    q = b.manifest["quantization"]
    assert q["recipe"] == "rtn-bs64-lmhead8" and q["block_size"] == 64 and q["lm_head"] == "int8"
    nodes = _matmulnbits(b)
    lm_head = [a for name, a in nodes.items() if name.startswith("/lm_head/")]
    assert [a["bits"] for a in lm_head] == [8]
    assert {a["bits"] for name, a in nodes.items() if not name.startswith("/lm_head/")} == {4}
    assert {a["block_size"] for a in nodes.values()} == {64}
    assert 0 < b.manifest["validation"]["teacher_forced_top1_agreement"] <= 1


def test_optimum_int4_export_records_its_recipe(tiny_llama_dir, tmp_path):
    """A mixed recipe on the optimum path: the sensitive layers' v and down projections in
    int8 (the first of two layers). Optimum's tied lm_head reads the embedding
    through a Transpose: it stays fp32, and the manifest says so."""
    b = export_model(str(tiny_llama_dir), precision="int4", exporter="optimum", store=tmp_path,
                     threads=THREADS, force=True, int4_recipe="rtn-bs64-mixed")
    q = b.manifest["quantization"]
    assert q["method"] == "rtn" and q["lm_head"] == "fp32"
    assert q["sensitive_layers"] == "int8" and q["block_size"] == 64
    bits = {name: a["bits"] for name, a in _matmulnbits(b).items()}
    wide = {name for name, n in bits.items() if n == 8}
    assert wide == {"/model/layers.0/self_attn/v_proj/MatMul_Q8",
                    "/model/layers.0/mlp/down_proj/MatMul_Q8"}, bits
    assert set(bits.values()) == {4, 8}


def test_float_bundles_record_no_quantization(tiny_genai_bundle):
    assert tiny_genai_bundle.manifest["quantization"] is None
