"""End to end on the real SmolLM2-135M-Instruct (builtin): fp32 and int4 by the genai path,
int8 by the optimum path. Each bundle is exported once per session (shared fixtures)."""

import json

import pytest

from edge_agent.bundle import open_bundle

pytestmark = pytest.mark.smollm2


def check_common(bundle, precision, runtime):
    b = open_bundle(bundle.path)  # every file verifies
    m = b.manifest
    assert m["precision"] == precision and m["runtime"] == runtime
    assert m["source"]["kind"] == "builtin" and len(m["source"]["sha256"]) == 64
    sig = m["signature"]
    assert (sig["num_layers"], sig["num_kv_heads"], sig["head_dim"], sig["vocab_size"]) == \
        (30, 3, 64, 49152)
    assert m["generation"]["eos_token_ids"] == [2]
    assert (b.path / "chat_template.jinja").read_text().startswith("{%")
    v = m["validation"]
    assert v["gate"]["passed"] is True and v["gate"]["forced"] is False
    assert v["ppl_increase_pct"] <= v["gate"]["max_ppl_increase_pct"]
    assert 10 < v["reference_perplexity"] < 60  # an English text, a real small LM
    return v


def test_fp32_matches_pytorch(smollm2_fp32_bundle):
    v = check_common(smollm2_fp32_bundle, "fp32", "onnxruntime-genai")
    assert v["teacher_forced_top1_agreement"] == 1.0
    assert v["max_abs_logit_diff"] < 0.01
    assert abs(v["ppl_increase_pct"]) < 0.1


def test_int4_genai_passes_the_gate(smollm2_int4_bundle, smollm2_fp32_bundle):
    v = check_common(smollm2_int4_bundle, "int4", "onnxruntime-genai")
    assert v["teacher_forced_top1_agreement"] >= 0.6
    cfg = json.loads((smollm2_int4_bundle.path / "genai_config.json").read_text())
    assert cfg["model"]["decoder"]["session_options"]["intra_op_num_threads"] == 2
    size = lambda b: sum(f["size"] for f in b.manifest["files"].values())  # noqa: E731
    assert size(smollm2_int4_bundle) < size(smollm2_fp32_bundle) / 4


def test_int8_optimum_passes_the_gate(smollm2_int8_bundle):
    v = check_common(smollm2_int8_bundle, "int8", "onnxruntime")
    assert v["teacher_forced_top1_agreement"] >= 0.6
