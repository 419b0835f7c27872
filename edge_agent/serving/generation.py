"""What chat and text completions share: admission, limits, and turning a sequence's tokens
into a response or a stream of chunks (vLLM's ``serving_engine``).

Token limits: a prompt that does not fit the context is a 400 naming both lengths; an
explicit ``max_tokens`` that would run past the context is a 400 naming the prompt length,
``max_tokens`` and the context; without ``max_tokens`` the agent generates up to
``max_tokens_default`` tokens, clamped to what the context leaves. Backpressure is decided
here, before anything is returned: a full queue is a 429 (type ``rate_limited``) with
``Retry-After``, so REST and MQTT share one queue and one set of limits.

A stream is an async iterator of chunk dicts. The last content chunk carries
``finish_reason``; with ``stream_options.include_usage`` a final chunk with empty ``choices``
carries ``usage``. A failure mid-stream yields one ``{"error": {...}}`` dict. Closing the
iterator (``aclose``) cancels the generation and frees its slot.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError

from edge_agent.engine.base import SamplingParams
from edge_agent.metrics import AgentMetrics
from edge_agent.scheduler import SequenceHandle
from edge_agent.serving.lifecycle import LoadedModel, ModelHost
from edge_agent.serving.protocol import (
    AssistantMessage,
    ChatCompletionChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChatCompletionStreamChoice,
    CompletionChoice,
    CompletionResponse,
    DeltaMessage,
    ErrorResult,
    PromptTokensDetails,
    UsageInfo,
    dump_chunk,
    error,
    validation_error,
)
from edge_agent.settings import AgentSettings
from edge_agent.text.detokenizer import IncrementalDetokenizer

log = logging.getLogger(__name__)

Result = ErrorResult | dict | AsyncIterator[dict]


# Text longer than this is rendered and tokenized in a worker thread: a long prompt must not
# hold the event loop (health checks, other streams) while it is read.
LARGE_TEXT_CHARS = 16 * 1024


async def off_loop_if_large(chars: int, fn, *args):
    """``fn(*args)``, in a worker thread when the text it reads is large."""
    if chars > LARGE_TEXT_CHARS:
        return await asyncio.to_thread(fn, *args)
    return fn(*args)


def unknown_model(asked: str, served: str) -> ErrorResult:
    return error(404, f"model {asked!r} is not served here; this agent serves {served!r}",
                 param="model", code="model_not_found")


def queue_full(retry_after: int) -> ErrorResult:
    return error(429, "the agent's queue is full; retry shortly", code="queue_full",
                 headers={"Retry-After": str(retry_after)})


def parse_body(body: Any, model_cls: type[BaseModel]) -> BaseModel | ErrorResult:
    """The request model of a parsed JSON body, or the 400 that names what is wrong."""
    if not isinstance(body, dict):
        return error(400, "the request body must be a JSON object")
    try:
        return model_cls.model_validate(body)
    except ValidationError as exc:
        return validation_error(exc)


class GenerationServing:
    """The shared part of the chat and completion endpoints."""

    endpoint: str
    chat: bool

    def __init__(self, settings: AgentSettings, host: ModelHost, metrics: AgentMetrics):
        self.settings = settings
        self.host = host
        self.metrics = metrics

    def _prepare(self, body: Any, model_cls) -> tuple[Any, LoadedModel] | ErrorResult:
        model = self.host.model
        req = parse_body(body, model_cls)
        if isinstance(req, ErrorResult):
            return req
        bad = req.unsupported()
        if bad:
            return error(400, f"parameter {bad} is not supported by this server", param=bad,
                         code="unsupported_parameter")
        if not model.generates:
            return error(400, f"model {model.bundle.name} is an embedding model; use "
                         "/v1/embeddings", param="model")
        if req.model and req.model != model.bundle.name:
            return unknown_model(req.model, model.bundle.name)
        return req, model

    async def _run(self, req, model: LoadedModel, prompt_ids: list[int], started: float,
                   source: str) -> Result:
        context = model.engine.context_length
        n_prompt = len(prompt_ids)
        if n_prompt == 0:
            return error(400, "the prompt is empty", param="prompt")
        if n_prompt >= context:
            return error(
                400, f"the prompt has {n_prompt} tokens; the model's context length is {context} "
                "(leave room for at least one generated token)",
                param="messages" if self.chat else "prompt", code="context_length_exceeded")
        wanted = req.requested_max_tokens()
        if wanted is not None and n_prompt + wanted > context:
            param = ("max_completion_tokens" if self.chat and req.max_completion_tokens
                     else "max_tokens")
            return error(
                400, f"{param} {wanted} plus the prompt's {n_prompt} tokens exceeds the model's "
                f"context length of {context}", param=param, code="context_length_exceeded")
        max_tokens = wanted or min(self.settings.max_tokens_default, context - n_prompt)
        params = SamplingParams(
            max_tokens=max_tokens, temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            top_k=0 if req.top_k in (None, -1) else req.top_k,
            seed=req.seed, stop=req.stop_list(), ignore_eos=req.ignore_eos)
        handle = model.scheduler.try_submit(prompt_ids, params, cache_salt=req.cache_salt)
        if handle is None:
            return queue_full(model.scheduler.retry_after_s())
        self.metrics.prompt_tokens.inc(n_prompt)
        meta = RequestMeta(self.endpoint, ("chatcmpl-" if self.chat else "cmpl-") + uuid.uuid4().hex,
                           int(time.time()), model.bundle.name, n_prompt, started, self.chat)
        tokens = _generate(self.metrics, model, handle, started)
        log.debug("request admitted", extra={"id": meta.id, "source": source,
                                              "prompt_tokens": n_prompt})
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return ChunkStream(_stream_chunks(self.metrics, meta, tokens, include_usage), handle)
        return await _collect(self.metrics, meta, tokens)


@dataclass
class RequestMeta:
    endpoint: str
    id: str
    created: int
    model: str
    prompt_tokens: int
    started: float
    chat: bool

    def usage(self, outcome: _Outcome) -> UsageInfo:
        return UsageInfo(
            prompt_tokens=self.prompt_tokens, completion_tokens=outcome.completion_tokens,
            total_tokens=self.prompt_tokens + outcome.completion_tokens,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=outcome.cached_tokens))

    def envelope(self) -> dict:
        """The fields every response object and chunk of this request shares."""
        return {"id": self.id, "created": self.created, "model": self.model}

    def response(self, text: str, outcome: _Outcome) -> dict:
        usage, finish_reason = self.usage(outcome), outcome.finish_reason
        if self.chat:
            choice = ChatCompletionChoice(index=0, message=AssistantMessage(content=text),
                                          finish_reason=finish_reason)
            return ChatCompletionResponse(**self.envelope(), choices=[choice],
                                          usage=usage).model_dump()
        choice = CompletionChoice(index=0, text=text, finish_reason=finish_reason)
        return CompletionResponse(**self.envelope(), choices=[choice], usage=usage).model_dump()

    def chunk(self, content: str | None, finish: str | None, with_usage: bool, *,
              role: bool = False) -> dict:
        if self.chat:
            delta = DeltaMessage(role="assistant" if role else None, content=content)
            chunk = ChatCompletionChunk(**self.envelope(), choices=[
                ChatCompletionStreamChoice(index=0, delta=delta, finish_reason=finish)])
        else:
            chunk = CompletionResponse(**self.envelope(), choices=[
                CompletionChoice(index=0, text=content or "", finish_reason=finish)])
        return dump_chunk(chunk, with_usage)

    def usage_chunk(self, outcome: _Outcome) -> dict:
        cls = ChatCompletionChunk if self.chat else CompletionResponse
        return dump_chunk(cls(**self.envelope(), choices=[], usage=self.usage(outcome)), True)


class ChunkStream:
    """The chunks of one streamed response, as an async iterator. ``ready()`` says whether
    more tokens are already waiting, so that a writer can send them together in one write."""

    def __init__(self, chunks: AsyncIterator[dict], handle: SequenceHandle):
        self._chunks = chunks
        self._handle = handle

    def __aiter__(self) -> ChunkStream:
        return self

    async def __anext__(self) -> dict:
        return await self._chunks.__anext__()

    def ready(self) -> bool:
        return not self._handle.events.empty()

    async def aclose(self) -> None:
        await self._chunks.aclose()


class _Outcome:
    """What the generator learnt by the end: finish reason, tokens, error."""

    finish_reason: str | None = None
    completion_tokens: int = 0
    cached_tokens: int = 0
    error: str | None = None


async def _generate(metrics: AgentMetrics, model: LoadedModel, handle: SequenceHandle,
                    started: float):
    """Text deltas of one sequence; the last item is the _Outcome. Cancels on close."""
    detok = IncrementalDetokenizer(model.engine.tokenizer, handle.params.stop)
    outcome = _Outcome()
    first_at = last_at = None
    consumed = 0
    try:
        async for event in handle:
            if event.token_id is not None:
                consumed += 1
                now = time.monotonic()
                if first_at is None:
                    first_at = now
                    metrics.ttft.observe(now - started)
                last_at = now
                text = detok.add(event.token_id)
                if detok.stopped:
                    handle.cancel()
                    outcome.finish_reason = "stop"
                    outcome.completion_tokens = consumed  # not what was decoded past the stop
                    if text:
                        yield text
                    break
                if text:
                    yield text
                continue
            if event.error:
                outcome.error = event.error
            else:
                tail = detok.flush()
                if tail:
                    yield tail
                outcome.finish_reason = event.finish_reason
        state = handle.state
        if not outcome.completion_tokens:  # ended by the scheduler: EOS counts, as in vLLM
            outcome.completion_tokens = len(state.generated) if state is not None else 0
        outcome.cached_tokens = state.cached_tokens if state is not None else 0
        yield outcome
    finally:
        handle.cancel()
        n = handle.state.generated if handle.state is not None else []
        metrics.generated_tokens.inc(len(n))
        cache = model.engine.prefix_cache
        if first_at is not None and cache is not None and cache.enabled:  # it was looked up
            metrics.prefix_cache_queries.inc(len(handle.prompt_ids))
            metrics.prefix_cache_hits.inc(handle.state.cached_tokens)
        if first_at is not None and consumed > 1:
            metrics.tpot.observe((last_at - first_at) / (consumed - 1))


async def _collect(metrics: AgentMetrics, meta: RequestMeta, stream) -> ErrorResult | dict:
    parts: list[str] = []
    outcome = None
    try:
        async for item in stream:
            if isinstance(item, _Outcome):
                outcome = item
            else:
                parts.append(item)
    finally:
        await stream.aclose()
    metrics.request_duration.labels(meta.endpoint).observe(time.monotonic() - meta.started)
    if outcome is None or outcome.error:
        return error(500, f"generation failed: {outcome.error if outcome else 'cancelled'}")
    return meta.response("".join(parts), outcome)


async def _stream_chunks(metrics: AgentMetrics, meta: RequestMeta, stream, include_usage: bool
                         ) -> AsyncIterator[dict]:
    try:
        if meta.chat:
            yield meta.chunk("", None, include_usage, role=True)
        async for item in stream:
            if isinstance(item, _Outcome):
                if item.error:
                    yield error(500, f"generation failed: {item.error}").body
                    return
                yield meta.chunk(None if meta.chat else "", item.finish_reason, include_usage)
                if include_usage:
                    yield meta.usage_chunk(item)
                return
            yield meta.chunk(item, None, include_usage)
    finally:
        await stream.aclose()
        # Recorded here, not by the HTTP layer, so MQTT streams are measured the same way.
        metrics.request_duration.labels(meta.endpoint).observe(time.monotonic() - meta.started)
