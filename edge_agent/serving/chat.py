"""``POST /v1/chat/completions``: render the messages (and tools) with the bundle's chat
template, then generate (``generation``)."""

from __future__ import annotations

import time
from typing import Any

from edge_agent.serving.generation import GenerationServing, Result, off_loop_if_large
from edge_agent.serving.protocol import ChatCompletionRequest, ErrorResult, error
from edge_agent.serving.tool_calls import (
    ConversationError,
    prompt_messages,
    template_reads_tools,
)
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
        req, model, plan = prepared
        if model.template is None:
            return error(400, f"model {model.bundle.name} has no chat template; use "
                         "/v1/completions", param="messages")
        native = template_reads_tools(model.template.source)
        try:
            messages = prompt_messages(req.messages, plan.tools, native)
        except ConversationError as exc:
            return error(400, f"invalid messages: {exc}", param=exc.param)
        except ValueError as exc:
            return error(400, f"invalid messages: {exc}", param="messages")
        extra = {"tools": plan.tools} if plan.tools and native else {}
        try:
            chars = sum(len(m["content"]) for m in messages)
            prompt_ids = await off_loop_if_large(chars, _prompt_ids, model, messages, extra)
        except (ValueError, TemplateError) as exc:
            return error(400, f"invalid messages: {exc}", param="messages")
        return await self._run(req, model, prompt_ids, started, source, plan)


def _prompt_ids(model, messages: list[dict], extra: dict) -> list[int]:
    text = model.template.render(messages, add_generation_prompt=True, **extra)
    return model.engine.tokenizer.encode(text, add_special_tokens=False).ids
