"""The real all-MiniLM-L6-v2, served: the agent's `/v1/embeddings`, directly and through the
router, against sentence-transformers' own output on the same sentences (cosine >= 0.999),
batched as a client would send them. Before the agent ignored the tokenizer.json padding, the
served embeddings had a cosine of 0.22-0.29 with these."""

from __future__ import annotations

import httpx
import numpy as np
import pytest

from tests.cloud_router.registry_support import start_registry
from tests.support.procs import EdgegenProcess, free_port, wait_http

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
    tmp = tmp_path_factory.mktemp("minilm")
    registry, consul = start_registry(tmp)
    agent_port, router_port = free_port(), free_port()
    agent = EdgegenProcess(["agent", "--bundle", str(minilm_bundle.path), "--node", "embedder",
                            "--port", str(agent_port), "--consul", consul, "--threads", "2",
                            "--advertise-host", "127.0.0.1"], tmp, "agent")
    router = EdgegenProcess(["router", "--consul", consul, "--port", str(router_port)], tmp,
                            "router")
    try:
        urls = (f"http://127.0.0.1:{agent_port}", f"http://127.0.0.1:{router_port}")
        wait_http(urls[0] + "/readyz", timeout=120, proc=agent.proc)
        wait_http(urls[1] + "/readyz", timeout=60, proc=router.proc)
        yield urls
    finally:
        for p in (router, agent, registry):
            p.stop()


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
