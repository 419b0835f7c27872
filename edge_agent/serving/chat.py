"""``POST /v1/chat/completions``: render the messages with the bundle's chat template, then
generate (``generation``)."""

from __future__ import annotations

import time
from typing import Any

from edge_agent.serving.generation import GenerationServing, Result
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
            text = model.template.render(messages, add_generation_prompt=True)
        except (ValueError, TemplateError) as exc:
            return error(400, f"invalid messages: {exc}", param="messages")
        prompt_ids = model.engine.tokenizer.encode(text, add_special_tokens=False).ids
        return await self._run(req, model, prompt_ids, started, source)
