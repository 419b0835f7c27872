"""``POST /v1/chat/completions``: render the messages with the bundle's chat template, then
generate (``generation``)."""

from __future__ import annotations

import time
from typing import Any

from edge_agent.serving.generation import GenerationServing, Result, off_loop_if_large
from edge_agent.serving.protocol import ChatCompletionRequest, ErrorResult, error
from edge_agent.text.chat_template import TemplateError

CHAT = "/v1/chat/completions"


class ChatServing(GenerationServing):
    endpoint = CHAT
    chat = True

    async def create_chat_completion(self, body: Any, *, source: str = "rest") -> Result:
        started = time.monotonic()
        prepared = self._prepare(body, ChatCompletionRequest)
        if isinstance(prepared, ErrorResult):
            return prepared
        req, model = prepared
        if model.template is None:
            return error(400, f"model {model.bundle.name} has no chat template; use "
                         "/v1/completions", param="messages")
        try:
            messages = [{"role": m.role, "content": m.text()} for m in req.messages]
            chars = sum(len(m["content"]) for m in messages)
            prompt_ids = await off_loop_if_large(chars, _prompt_ids, model, messages)
        except (ValueError, TemplateError) as exc:
            return error(400, f"invalid messages: {exc}", param="messages")
        return await self._run(req, model, prompt_ids, started, source)


def _prompt_ids(model, messages: list[dict]) -> list[int]:
    text = model.template.render(messages, add_generation_prompt=True)
    return model.engine.tokenizer.encode(text, add_special_tokens=False).ids
