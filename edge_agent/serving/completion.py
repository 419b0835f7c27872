"""``POST /v1/completions``: a text prompt (or token ids) straight to generation."""

from __future__ import annotations

import time
from typing import Any

from edge_agent.serving.generation import GenerationServing, Result, off_loop_if_large
from edge_agent.serving.protocol import CompletionRequest, ErrorResult, error

COMPLETIONS = "/v1/completions"


class CompletionServing(GenerationServing):
    endpoint = COMPLETIONS
    chat = False

    async def create_completion(self, body: Any, *, source: str = "rest") -> Result:
        started = time.monotonic()
        prepared = self._prepare(body, CompletionRequest)
        if isinstance(prepared, ErrorResult):
            return prepared
        req, model, plan = prepared
        prompt = req.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
            vocab = model.engine.tokenizer.get_vocab_size()
            if any(not isinstance(t, int) or t < 0 or t >= vocab for t in prompt):
                return error(400, f"prompt token ids must lie in [0, {vocab})", param="prompt")
            prompt_ids = list(prompt)
        else:
            text = prompt[0] if isinstance(prompt, list) else prompt
            prompt_ids = await off_loop_if_large(len(text), _prompt_ids, model, text)
        return await self._run(req, model, prompt_ids, started, source, plan)


def _prompt_ids(model, text: str) -> list[int]:
    return model.engine.tokenizer.encode(text, add_special_tokens=True).ids  # BOS, as HF does
