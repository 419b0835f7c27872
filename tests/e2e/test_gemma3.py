"""The real Gemma 3 270M (``builtin:gemma3-270m``), exported at its default precision (int8)
and served.

Compared with what llama.cpp does with the same GGUF, recorded by
``benchmarks/llamacpp_reference.py`` in ``tests/data/llamacpp_gemma3-270m.json`` (llama.cpp is
a benchmark-only dependency): the agent's tokenizer gives llama.cpp's ids for every recorded
string, and its greedy completions are llama.cpp's. Before the GGUF's SentencePiece
vocabulary was read as llama.cpp reads it, "Water boils at a temperature of" was completed
with " 11.500 meters" (llama.cpp: " 100 degrees Celsius.").
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from tests.e2e.agent_support import start_agent

RECORDING = json.loads(
    (Path(__file__).parents[1] / "data" / "llamacpp_gemma3-270m.json").read_text())
# The bundle's weights are the GGUF's dequantized and quantized again to int8, and llama.cpp
# reads the GGUF's own Q4_K/Q5_0/Q6_K/Q8_0 blocks: the two computations differ slightly, so a
# greedy run may part at a near-tie (measured: 62 of 96 tokens before the first difference;
# the fp32 bundle: 90 of 96). All but one completion must begin with llama.cpp's first words,
# and on average agree for more than half their length. Before the vocabulary was read as
# llama.cpp reads it, no completion began with llama.cpp's words.
FIRST_WORDS = 2
MEAN_AGREEMENT = 0.5


def leading_agreement(text: str, want: str) -> float:
    """The share of ``want`` (characters) that ``text`` begins with."""
    same = next((i for i, (a, b) in enumerate(zip(text, want)) if a != b),
                min(len(text), len(want)))
    return same / len(want)


@pytest.fixture(scope="module")
def agent(tmp_path_factory, gemma3_bundle):
    a = start_agent(gemma3_bundle.path, tmp_path_factory.mktemp("gemma3"), "gemma3")
    yield a
    a.stop()


def test_the_served_tokenizer_is_llamacpps(gemma3_bundle):
    from edge_agent.engine.base import load_tokenizer

    tokenizer = load_tokenizer(gemma3_bundle)
    compared = 0
    for item in RECORDING["tokenized"]:
        # the agent parses control pieces (<start_of_turn>) in prompts: llama.cpp's special=True
        if item["special"] or "<start_of_turn>" not in item["text"]:
            assert tokenizer.encode(item["text"]).ids == item["ids"], item["text"]
            compared += 1
    assert compared >= 20


def test_greedy_completions_are_llamacpps(agent, gemma3_bundle):
    agreements, begins = [], []
    for item in RECORDING["greedy"]:
        r = httpx.post(agent.url + "/v1/completions", timeout=120, json={
            "model": gemma3_bundle.name, "prompt": item["prompt"], "temperature": 0,
            "max_tokens": len(item["ids"])})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["usage"]["prompt_tokens"] == len(item["prompt_ids"])
        text, want = body["choices"][0]["text"], item["text"]
        begins.append(text.split()[:FIRST_WORDS] == want.split()[:FIRST_WORDS])
        agreements.append(leading_agreement(text, want))
    assert sum(begins) >= len(begins) - 1, begins
    assert sum(agreements) / len(agreements) >= MEAN_AGREEMENT, agreements


def test_a_base_model_has_no_chat_endpoint(agent, gemma3_bundle):
    r = httpx.post(agent.url + "/v1/chat/completions", timeout=30, json={
        "model": gemma3_bundle.name, "messages": [{"role": "user", "content": "Hi"}]})
    assert r.status_code == 400, r.text
    assert "chat template" in r.json()["error"]["message"]


def test_validation_went_through_the_served_path(gemma3_bundle):
    assert gemma3_bundle.manifest["precision"] == "int8"
    figures = gemma3_bundle.manifest["validation"]
    assert figures["served_tokenizer_match"] == 1.0
    assert figures["reference_perplexity"] < 40  # the misread vocabulary gave 215
    assert figures["beyond_window_tokens"] > 512  # its sliding window was exercised
    assert figures["served_greedy_agreement"] >= 0.5
