"""export_model's decisions, tested on plain configs (no model is loaded here)."""

import json

import pytest

from exporters import pipeline
from exporters.errors import ExportOptionError, UnsupportedModel, ValidationFailed

LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
         "max_position_embeddings": 8192, "eos_token_id": 2, "bos_token_id": 1}
GPT2 = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_positions": 1024}
GPT2_CAUSAL = {**GPT2, "architectures": ["GPT2ForCausalLM"]}
BERT = {"architectures": ["BertModel"], "model_type": "bert", "max_position_embeddings": 512}
ALIEN = {"architectures": ["AlienForCausalLM"], "model_type": "alien"}


@pytest.mark.parametrize("config, task, precision, requested, expected", [
    (LLAMA, "text-generation", "int4", None, "genai"),
    (LLAMA, "text-generation", "int8", "optimum", "optimum"),
    (GPT2_CAUSAL, "text-generation", "int8", None, "optimum"),   # not a builder architecture
    (BERT, "feature-extraction", "fp32", None, "optimum"),
])
def test_choose_exporter(config, task, precision, requested, expected):
    assert pipeline.choose_exporter(config, task, precision, requested)[0] == expected


def test_unsupported_architecture_names_the_paths_tried():
    with pytest.raises(UnsupportedModel) as err:
        pipeline.choose_exporter(ALIEN, "text-generation", "int4", None)
    msg = str(err.value)
    assert "AlienForCausalLM" in msg and "genai" in msg and "optimum" in msg


def test_forcing_a_path_that_cannot_take_the_model_says_so():
    with pytest.raises(UnsupportedModel, match="genai exporter does not support BertModel"):
        pipeline.choose_exporter(BERT, "feature-extraction", "fp32", "genai")


@pytest.mark.parametrize("config, requested, expected", [
    (LLAMA, None, 2048),         # capped default
    (BERT, None, 512),           # the model's own, smaller
    (LLAMA, 8192, 8192),
    (GPT2, 1024, 1024),
])
def test_context_length(config, requested, expected):
    assert pipeline.resolve_context_length(config, requested) == expected


def test_context_length_beyond_the_model_is_refused():
    with pytest.raises(ExportOptionError, match="larger than the model's maximum of 8192"):
        pipeline.resolve_context_length(LLAMA, 8193)


@pytest.mark.parametrize("kwargs, match", [
    ({"precision": "int3"}, "--precision 'int3'"),
    ({"device": "tpu"}, "--device 'tpu'"),
    ({"exporter": "tflite"}, "--exporter 'tflite'"),
    ({"context_length": 4}, "too small"),
    ({"trt": True, "exporter": "optimum"}, "--trt builds with the genai exporter"),
])
def test_bad_options(kwargs, match):
    opts = {"precision": None, "task": None, "device": "cpu", "exporter": None, "trt": False,
            "context_length": None, **kwargs}
    with pytest.raises(ExportOptionError, match=match):
        pipeline.check_options(**opts)


@pytest.mark.parametrize("kwargs, match", [
    ({"precision": "fp16", "device": "cpu", "trt": False}, "fp16 export needs a GPU"),
    ({"precision": "int4", "device": "cuda", "trt": False}, "--device cuda needs a GPU"),
    ({"precision": None, "device": "cpu", "trt": True}, "--trt needs TensorRT and a GPU"),
])
def test_gpu_options_fail_at_once_on_a_cpu_machine(kwargs, match):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.fail("this test describes a CPU-only machine")
    with pytest.raises(ExportOptionError, match=match):
        pipeline.check_device(**kwargs)


def test_infer_task():
    assert pipeline.infer_task(LLAMA) == "text-generation"
    assert pipeline.infer_task(BERT) == "feature-extraction"
    with pytest.raises(UnsupportedModel, match="--task"):
        pipeline.infer_task({"architectures": ["BertForQuestionAnswering"]})


def test_generation_ids_prefer_generation_config(tmp_path):
    (tmp_path / "generation_config.json").write_text(json.dumps(
        {"eos_token_id": [2, 7], "pad_token_id": 0}))
    assert pipeline.generation_ids(tmp_path, LLAMA) == {
        "eos_token_ids": [2, 7], "bos_token_id": 1, "pad_token_id": 0}


def test_fp32_parity_rejects_a_graph_that_disagrees():
    good = {"perplexity": 10.0, "max_abs_logit_diff": 1e-4, "teacher_forced_top1_agreement": 1.0}
    pipeline.check_fp32_parity("fp32", good)
    with pytest.raises(ValidationFailed, match="agreement 98.0%"):
        pipeline.check_fp32_parity("fp32", {**good, "teacher_forced_top1_agreement": 0.98})
    with pytest.raises(ValidationFailed, match="logit diff"):
        pipeline.check_fp32_parity("fp32", {**good, "max_abs_logit_diff": 0.5})
    pipeline.check_fp32_parity("int4", {**good, "max_abs_logit_diff": 9.0})  # the gate's job


def test_an_encoder_cannot_be_asked_to_generate_text():
    assert pipeline.check_task(LLAMA, "text-generation") == "text-generation"
    assert pipeline.check_task(GPT2, "text-generation") == "text-generation"
    assert pipeline.check_task(BERT, "feature-extraction") == "feature-extraction"
    with pytest.raises(UnsupportedModel, match="BertModel is an encoder .* --task "
                                               "feature-extraction"):
        pipeline.check_task(BERT, "text-generation")


def test_a_vocabulary_that_cannot_be_loaded_is_refused_before_any_work(tmp_path):
    from exporters.errors import SourceError

    (tmp_path / "tokenizer.json").write_text('{"model": {"type": "Nope"}}')
    with pytest.raises(SourceError, match="tokenizer.json cannot be loaded: ") as err:
        pipeline.check_tokenizer(tmp_path)
    assert "\n" not in str(err.value)


def test_served_figures_refuse_a_tokenizer_that_differs_from_the_reference():
    pipeline.check_served({"served_tokenizer_match": 1.0})
    with pytest.raises(ValidationFailed, match="encodes 25% of the validation prompts"):
        pipeline.check_served({"served_tokenizer_match": 0.75})


def test_sliding_window():
    assert pipeline.sliding_window({"sliding_window": 512}) == 512
    assert pipeline.sliding_window({"sliding_window": None}) is None
    assert pipeline.sliding_window(LLAMA) is None
