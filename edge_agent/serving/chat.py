"""``POST /v1/chat/completions``: render the messages (and tools) with the bundle's chat
template, then generate (``generation``).

``continue_final_message`` (vLLM's) continues the last, assistant, message: the prompt is the
rendered conversation cut just after that message's text, so the model goes on writing it. A
request that also carries ``RESUME_HEADER`` resumes a generation cut short elsewhere (the
router sends it when an edge died mid-stream): the final message's tokens are then counted as
this generation's own, against ``max_tokens`` and in ``usage.completion_tokens``, so the
client sees the budget and the usage of one uninterrupted generation.
"""

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
RESUME_HEADER = "x-edgegen-resume"   # the wire contract with the router (same copy there)


class ChatServing(GenerationServing):
    endpoint = CHAT
    chat = True

    async def create_chat_completion(self, body: Any, *, source: str = "rest",
                                     resume: bool = False) -> Result:
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
        final = _final_text(req, messages)
        if isinstance(final, ErrorResult):
            return final
        try:
            chars = sum(len(m["content"]) for m in messages)
            prompt_ids, continued = await off_loop_if_large(
                chars, _prompt_ids, model, messages, extra, req.generation_prompt(), final)
        except (ValueError, TemplateError) as exc:
            return error(400, f"invalid messages: {exc}", param="messages")
        return await self._run(req, model, prompt_ids, started, source, plan,
                               continued=continued if resume else 0)


def _final_text(req: ChatCompletionRequest, messages: list[dict]) -> str | None | ErrorResult:
    """The text of the message to continue (None: open a new one), or the 400."""
    if not req.continue_final_message:
        return None
    if req.add_generation_prompt:
        return error(400, "continue_final_message and add_generation_prompt cannot both be "
                     "true", param="add_generation_prompt")
    last = messages[-1]
    if last["role"] != "assistant" or not isinstance(last["content"], str) \
            or not last["content"].strip():
        return error(400, "continue_final_message needs a final assistant message with text",
                     param="messages")
    return last["content"]


def _prompt_ids(model, messages: list[dict], extra: dict, generation_prompt: bool,
                final: str | None) -> tuple[list[int], int]:
    """The prompt's token ids, and how many of them are the continued message's text."""
    text = model.template.render(messages, add_generation_prompt=generation_prompt, **extra)
    encode = model.engine.tokenizer.encode
    if final is None:
        return encode(text, add_special_tokens=False).ids, 0
    # Cut after the final message's text, as transformers' continue_final_message does
    # (templates that strip messages hold the stripped text).
    for piece in (final, final.strip()):
        at = text.rfind(piece)
        if at >= 0:
            break
    else:
        raise ValueError("the chat template does not render the final message's text")
    ids = encode(text[:at + len(piece)], add_special_tokens=False).ids
    return ids, len(ids) - len(encode(text[:at], add_special_tokens=False).ids)
