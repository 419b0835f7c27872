"""The architectures users bring, end to end: llama, qwen2, phi3, mistral, gemma2 and gemma3
(``Gemma3ForCausalLM``, text only), each a tiny random model built here from its
transformers config (SmolLM2's tokenizer, so vocab 49152), exported fp32, served by a real
agent over HTTP, and its greedy tokens compared with transformers' own greedy ``generate``
on the same model in fp32 (eager attention: the model as defined).

What makes these architectures differ is switched on and made to matter: sliding windows of
16 positions (mistral: every layer; gemma2: the even layers; gemma3: five local layers to one
global, with their own rope base) under prompts of ~30 tokens; gemma2's attention and final
logit softcapping; gemma's sqrt(hidden) embedding scale and (1 + w) norms; gemma3's q/k norms;
qwen2's qkv bias; phi3's fused qkv and gate_up projections. Norm weights and biases, which
transformers initializes to constants, are drawn at random so that each of them counts.
``test_the_prompts_exercise_each_feature`` shows that switching a feature off changes the
reference's tokens, so agreement is not luck. One architecture is also exported int4.
"""

from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import onnx
import pytest
from tokenizers import Tokenizer

from edge_agent.bundle import iter_bundles
from edge_agent.text.detokenizer import IncrementalDetokenizer
from exporters.errors import UnsupportedModel
from exporters.onnx_graph import GLOBAL, attention_windows, layer_windows
from exporters.pipeline import export_model
from tests.e2e.agent_support import start_agent

N = 12
WINDOW = 16
PROMPTS = (  # ~30 tokens each: every generated token is past the window
    ("Once upon a time, in a small village at the edge of a great forest, there lived an old "
     "woodcutter and his three daughters, who"),
    ("The committee met on Tuesday to discuss the budget for next year, and after a long "
     "debate about roads, schools and parks, the chair said that"),
    ("def merge_sorted(a, b):\n    result = []\n    i = j = 0\n    while i < len(a) and "
     "j < len(b):\n"),
)
# initializer_range 0.1 (conftest's tiny llama too): random logits far from ties
COMMON = {"vocab_size": 49152, "hidden_size": 64, "intermediate_size": 128,
          "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
          "max_position_embeddings": 1024, "bos_token_id": 1, "eos_token_id": 2,
          "pad_token_id": 2, "initializer_range": 0.1}


def make_config(arch: str):
    import transformers as tf

    if arch == "qwen2":
        return tf.Qwen2Config(**COMMON, tie_word_embeddings=True)
    if arch == "phi3":
        return tf.Phi3Config(**COMMON, original_max_position_embeddings=1024)
    if arch == "mistral":
        return tf.MistralConfig(**COMMON, head_dim=16, sliding_window=WINDOW)
    if arch == "gemma2":
        return tf.Gemma2Config(**COMMON, head_dim=16, sliding_window=WINDOW,
                               query_pre_attn_scalar=24, attn_logit_softcapping=1.5,
                               final_logit_softcapping=2.5)
    if arch == "gemma3":  # six layers: five local, one global (its default pattern)
        return tf.Gemma3TextConfig(**{**COMMON, "num_hidden_layers": 6, "hidden_size": 96},
                                   head_dim=16, sliding_window=WINDOW, query_pre_attn_scalar=24,
                                   rope_theta=1e6, rope_local_base_freq=1e4)
    raise ValueError(arch)


# (architecture, what switches one feature off: config overrides, or a change to the weights)
FEATURES = {
    ("mistral", "sliding window"): {"sliding_window": 4096},
    ("gemma2", "sliding window"): {"sliding_window": 4096},
    ("gemma2", "attention softcapping"): {"attn_logit_softcapping": None},
    ("gemma3", "sliding window"): {"sliding_window": 4096},
    ("gemma3", "local rope base"): {"rope_local_base_freq": 1e6},
    ("qwen2", "qkv bias"): "zero_bias",
}
# (architecture, exporter): the genai builder takes all six (its default path); optimum,
# which takes them too, on gemma2: softcapping, sliding layers and global ones in one trace
CASES = [("llama", "genai"), ("qwen2", "genai"), ("phi3", "genai"), ("mistral", "genai"),
         ("gemma2", "genai"), ("gemma3", "genai"), ("gemma2", "optimum")]


def build_source(arch: str, out: Path, tokenizer_dir: Path) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(make_config(arch)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:  # norm weights and biases: constants at init (gemma's norms 0)
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(out)
    GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=2).save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy2(tokenizer_dir / name, out / name)
    return out


def reference_greedy(src: Path, ids: list[list[int]], switch_off=None) -> list[list[int]]:
    """transformers' greedy generate, fp32, eager attention; EOS neither stops nor is masked
    (as the agent's ``ignore_eos``)."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    overrides = switch_off if isinstance(switch_off, dict) else {}
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32,
                                                 attn_implementation="eager", **overrides).eval()
    if switch_off == "zero_bias":
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("_proj.bias"):
                    p.zero_()
    gen = GenerationConfig(do_sample=False, max_new_tokens=N, pad_token_id=2)
    out = []
    for prompt in ids:
        x = torch.tensor([prompt])
        y = model.generate(x, attention_mask=torch.ones_like(x), generation_config=gen,
                           use_model_defaults=False)
        out.append(y[0, len(prompt):].tolist())
    return out


def as_served(tok: Tokenizer, ids: list[int]) -> str:
    """The text the agent sends for ``ids`` (an incomplete last character is dropped)."""
    d = IncrementalDetokenizer(tok)
    return "".join(d.add(i) for i in ids) + d.flush()


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """torch on one thread while this module runs (the exports' validation, the references):
    on models this small its ops take microseconds, and two threads on a busy 2-core machine
    spend them waiting on each other (measured: reference forwards 2-6x slower)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def source(request, tmp_path_factory, smollm2_source_dir):
    """arch -> its tiny model folder, built on first use (llama: conftest's tiny_llama_dir)."""
    root = tmp_path_factory.mktemp("architectures")
    made = {}

    def get(arch: str) -> Path:
        if arch not in made:
            made[arch] = (request.getfixturevalue("tiny_llama_dir") if arch == "llama"
                          else build_source(arch, root / arch, smollm2_source_dir))
        return made[arch]
    return get


@pytest.fixture(scope="module")
def exported(request, source, tmp_path_factory):
    """(arch, exporter, precision) -> its bundle, exported once (llama genai fp32: conftest's)."""
    store = tmp_path_factory.mktemp("architectures-store")
    made = {}

    def get(arch: str, exporter: str, precision: str = "fp32"):
        key = (arch, exporter, precision)
        if key not in made:
            if key == ("llama", "genai", "fp32"):
                made[key] = request.getfixturevalue("tiny_genai_bundle")
            else:
                made[key] = export_model(str(source(arch)), name=f"tiny-{arch}",
                                         precision=precision, exporter=exporter, store=store,
                                         threads=2, force=precision != "fp32")
        return made[key]
    return get


@pytest.fixture(scope="module")
def reference(source, smollm2_source_dir):
    tok = Tokenizer.from_file(str(smollm2_source_dir / "tokenizer.json"))
    prompt_ids = [tok.encode(p).ids for p in PROMPTS]
    made = {}

    def get(arch: str, switch_off=None) -> list[list[int]]:
        key = (arch, repr(switch_off))
        if key not in made:
            made[key] = reference_greedy(source(arch), prompt_ids, switch_off)
        return made[key]
    return get


def served_texts(bundle, log_dir: Path, name: str) -> tuple[list, list]:
    """(text, completion tokens) per prompt from a real agent: one request after another (a
    lone sequence, batch 1), then all at once (one onnxruntime run for every sequence)."""
    agent = start_agent(bundle.path, log_dir, name)

    def complete(prompt: str) -> tuple[str, int]:
        r = httpx.post(agent.url + "/v1/completions", timeout=120, json={
            "prompt": prompt, "max_tokens": N, "temperature": 0, "ignore_eos": True})
        assert r.status_code == 200, r.text
        body = r.json()
        return body["choices"][0]["text"], body["usage"]["completion_tokens"]
    try:
        alone = [complete(p) for p in PROMPTS]
        with ThreadPoolExecutor(len(PROMPTS)) as pool:
            together = list(pool.map(complete, PROMPTS))
    finally:
        assert agent.stop() == 0
    return alone, together


def engine_together(bundle, prompt_ids: list[list[int]]) -> list[list[int]]:
    """The agent's engine as its loader loads it, every prompt started at once and stepped
    together, as the scheduler does with requests that arrive together: batched, whatever the
    timing of HTTP requests."""
    from edge_agent.engine.base import SamplingParams, generate
    from edge_agent.engine.loader import load_engine
    from edge_agent.settings import AgentSettings

    engine = load_engine(bundle, AgentSettings(bundle=str(bundle.path), node="t", threads=2))
    try:
        out = generate(engine, prompt_ids,
                       SamplingParams(max_tokens=N, temperature=0.0, ignore_eos=True))
        assert all(isinstance(tokens, list) for tokens in out), out
        return out
    finally:
        engine.close()


def config_window(src: Path) -> int:
    """The window of every layer of a model without per-layer types (GLOBAL: none)."""
    window = json.loads((src / "config.json").read_text()).get("sliding_window")
    return window if isinstance(window, int) else GLOBAL


@pytest.mark.parametrize("arch, exporter", CASES, ids=[f"{a}-{e}" for a, e in CASES])
def test_served_greedy_tokens_equal_transformers(arch, exporter, exported, reference, source,
                                                 tmp_path):
    bundle = exported(arch, exporter)
    m = bundle.manifest
    assert (m["exporter"], m["precision"]) == (exporter, "fp32")
    assert m["validation"]["teacher_forced_top1_agreement"] == 1.0
    assert m["validation"]["max_abs_logit_diff"] < 1e-2
    if exporter == "genai":  # each layer attends as far as it does in transformers
        windows = list(attention_windows(bundle.path / "model.onnx").values())
        assert windows == (layer_windows(source(arch))
                           or [config_window(source(arch))] * len(windows))
    tok = Tokenizer.from_file(str(bundle.file("tokenizer.json")))
    assert engine_together(bundle, [tok.encode(p).ids for p in PROMPTS]) == reference(arch)
    wanted = [(as_served(tok, ids), N) for ids in reference(arch)]
    alone, together = served_texts(bundle, tmp_path, f"{arch}-{exporter}")
    assert alone == wanted
    assert together == wanted


@pytest.mark.parametrize("arch, feature", list(FEATURES), ids=[f"{a}-{f}" for a, f in FEATURES])
def test_the_prompts_exercise_each_feature(arch, feature, reference):
    """Switched off, the feature changes the reference's greedy tokens on these prompts, so
    the served tokens equal the reference's only if the engine computes it."""
    assert reference(arch, FEATURES[arch, feature]) != reference(arch)


def test_int4_export_is_quantized_and_served(exported, tmp_path):
    """gemma3 (q/k norms, local and global rope) in int4: MatMulNBits weights, the cost
    recorded, and the agent serves it, alone and batched (its tokens need not equal fp32's,
    nor, at int4, the batched ones the lone ones: other kernels, other rounding)."""
    bundle = exported("gemma3", "genai", "int4")
    m = bundle.manifest
    assert (m["exporter"], m["precision"]) == ("genai", "int4")
    graph = onnx.load(str(bundle.path / "model.onnx"), load_external_data=False).graph
    assert "MatMulNBits" in {n.op_type for n in graph.node}
    v = m["validation"]
    assert v["perplexity"] > 1 and 0 < v["teacher_forced_top1_agreement"] <= 1
    fp32 = exported("gemma3", "genai")
    assert m["files"]["model.onnx.data"]["size"] < fp32.manifest["files"]["model.onnx.data"]["size"]
    alone, together = served_texts(bundle, tmp_path, "gemma3-int4")
    assert [n for _, n in alone + together] == [N] * 2 * len(PROMPTS)


def test_an_architecture_no_path_supports_is_refused(tmp_path):
    """Mamba (a real transformers architecture: state-space, no attention) is in neither the
    genai builder nor optimum-onnx: one line naming it and the paths tried, nothing written."""
    import torch
    from transformers import MambaConfig, MambaForCausalLM

    src = tmp_path / "mamba"
    torch.manual_seed(0)
    MambaForCausalLM(MambaConfig(vocab_size=64, hidden_size=16, state_size=4,
                                 num_hidden_layers=1)).save_pretrained(src)
    store = tmp_path / "store"
    with pytest.raises(UnsupportedModel) as err:
        export_model(str(src), store=store, threads=2)
    msg = str(err.value)
    assert "\n" not in msg
    assert "MambaForCausalLM" in msg and "genai" in msg and "optimum" in msg
    assert list(iter_bundles(store)) == []
    assert [p.name for p in store.iterdir()] == []
