"""The real SmolLM2-135M-Instruct int4 bundle answers a real question through the openai client."""

from __future__ import annotations

import openai
import pytest

from tests.e2e.agent_support import start_agent

pytestmark = pytest.mark.smollm2


def test_smollm2_int4_answers_a_real_question(smollm2_int4_bundle, tmp_path):
    a = start_agent(smollm2_int4_bundle.path, tmp_path, "smol")
    try:
        client = openai.OpenAI(base_url=a.url + "/v1", api_key="x", timeout=120)
        question = [{"role": "user", "content": "What is the capital of France?"}]
        r = client.chat.completions.create(model=smollm2_int4_bundle.name, messages=question,
                                           max_tokens=40, temperature=0)
        assert "Paris" in r.choices[0].message.content
        streamed = "".join(
            c.choices[0].delta.content or "" for c in client.chat.completions.create(
                model=smollm2_int4_bundle.name, messages=question, max_tokens=40,
                temperature=0, stream=True) if c.choices)
        assert streamed == r.choices[0].message.content
        assert "Ġ" not in streamed and "Ċ" not in streamed
    finally:
        assert a.stop() == 0
