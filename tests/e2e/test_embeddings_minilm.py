"""The real all-MiniLM-L6-v2, served: the agent's `/v1/embeddings`, directly and through the
router, against sentence-transformers' own output on the same sentences (cosine >= 0.999),
batched as a client would send them. Before the agent ignored the tokenizer.json padding, the
served embeddings had a cosine of 0.22-0.29 with these."""

from __future__ import annotations

import httpx
import numpy as np
import pytest

from tests.e2e.agent_support import agent_behind_router

SENTENCES = [
    "The valve on line 3 reports fault code E42.",
    "A man is eating food.",
    "Water boils at 100 degrees Celsius at sea level.",
    "Le chat dort sur le canapé.",
    "Quarterly revenue rose by 12% compared with last year, driven by services.",
    "ok",
    "The quick brown fox jumps over the lazy dog " * 8,
]


@pytest.fixture(scope="module")
def reference(minilm_bundle):
    from sentence_transformers import SentenceTransformer

    from exporters.sources import resolve_source

    folder = resolve_source("builtin:all-minilm-l6-v2").hf_dir
    model = SentenceTransformer(str(folder), device="cpu")
    return model.encode(SENTENCES, normalize_embeddings=True)


@pytest.fixture(scope="module")
def stack(tmp_path_factory, minilm_bundle):
    with agent_behind_router(tmp_path_factory.mktemp("minilm"), minilm_bundle, "embedder",
                             threads=2) as s:
        yield s.agent_url, s.router_url


@pytest.mark.parametrize("via", ["agent", "router"])
def test_served_embeddings_match_sentence_transformers(stack, reference, minilm_bundle, via):
    url = stack[0] if via == "agent" else stack[1]
    r = httpx.post(url + "/v1/embeddings", timeout=60,
                   json={"model": minilm_bundle.name, "input": SENTENCES})
    assert r.status_code == 200, r.text
    got = np.array([d["embedding"] for d in r.json()["data"]], dtype=np.float32)
    assert got.shape == reference.shape == (len(SENTENCES), 384)
    cosines = np.sum(got * reference, axis=1) / (
        np.linalg.norm(got, axis=1) * np.linalg.norm(reference, axis=1))
    assert cosines.min() >= 0.999, cosines
    if via == "router":
        assert r.headers["x-edgegen-node"] == "embedder"
    # one at a time (no padding in the batch) gives the same vectors
    single = httpx.post(url + "/v1/embeddings", timeout=60,
                        json={"model": minilm_bundle.name, "input": SENTENCES[5]}).json()
    assert np.dot(single["data"][0]["embedding"], reference[5]) >= 0.999


def test_the_export_recorded_the_served_cosine(minilm_bundle):
    figures = minilm_bundle.manifest["validation"]
    assert figures["min_served_cosine"] >= 0.9999 and minilm_bundle.context_length == 256
