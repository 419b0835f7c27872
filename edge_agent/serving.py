"""The OpenAI endpoints' logic, shared by the HTTP router and the MQTT bridge.

Each ``create_*`` coroutine takes the parsed JSON body and returns one of:

- an ``ErrorResult`` (``protocol``): an OpenAI error body with its HTTP status,
- a response dict (``chat.completion``, ``text_completion``, embeddings ``list``),
- an async iterator of chunk dicts when ``stream`` is true. The last content chunk carries
  ``finish_reason``; with ``stream_options.include_usage`` a final chunk with empty
  ``choices`` carries ``usage``. A failure mid-stream yields one ``{"error": {...}}`` dict.
  Closing the iterator (``aclose``) cancels the generation and frees its slot.

Backpressure is decided here, before anything is returned: a full queue gives
``ErrorResult`` 429 (type ``rate_limited``) with ``Retry-After``, so REST and MQTT share one
queue and one set of limits. Token limits: a prompt that does not fit the context is a
400 naming both lengths; an explicit ``max_tokens`` that would run past the context is a
400 naming the prompt length, ``max_tokens`` and the context; without ``max_tokens`` the
agent generates up to ``max_tokens_default`` tokens, clamped to what the context leaves.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from edge_agent.bundle import Bundle, open_bundle
from edge_agent.chat_template import ChatTemplate, TemplateError
from edge_agent.detokenizer import IncrementalDetokenizer
from edge_agent.engine import SamplingParams, load_engine
from edge_agent.metrics import AgentMetrics
from edge_agent.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    ErrorResult,
    error,
    validation_error,
)
from edge_agent.scheduler import Scheduler, SequenceHandle
from edge_agent.settings import AgentSettings

log = logging.getLogger(__name__)

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
EMBEDDINGS = "/v1/embeddings"


@dataclass
class LoadedModel:
    """A bundle with its engine, scheduler (generation) and chat template, ready to serve."""

    bundle: Bundle
    engine: Any
    scheduler: Scheduler | None
    template: ChatTemplate | None
    embed_slots: asyncio.Semaphore | None = None
    embed_waiting: int = 0

    @property
    def generates(self) -> bool:
        return self.scheduler is not None

    async def close(self) -> None:
        if self.scheduler is not None:
            await self.scheduler.close()
        await asyncio.to_thread(self.engine.close)


def load_model(bundle: Bundle, settings: AgentSettings) -> LoadedModel:
    """Load ``bundle``'s engine (blocking: run it in a thread from async code)."""
    engine = load_engine(bundle, settings)
    if bundle.task == "feature-extraction":
        return LoadedModel(bundle, engine, None, None,
                           embed_slots=asyncio.Semaphore(settings.max_concurrency))
    scheduler = Scheduler(engine, max_concurrency=settings.max_concurrency,
                          queue_size=settings.queue_size,
                          stream_interval=settings.stream_interval_ms / 1000)
    return LoadedModel(bundle, engine, scheduler, ChatTemplate.from_bundle(bundle))


class OpenAIServing:
    def __init__(self, settings: AgentSettings, model: LoadedModel, metrics: AgentMetrics):
        self.settings = settings
        self.model = model
        self.metrics = metrics
        self.draining = False
        self._swap_lock = asyncio.Lock()
        metrics.set_bundle(model.bundle.name, model.bundle.digest12, model.bundle.precision)
        metrics.queue_depth.set_function(self._queue_depth)
        metrics.inflight.set_function(self._inflight)

    # -- state ----------------------------------------------------------------------------

    def _queue_depth(self) -> int:
        m = self.model
        return m.scheduler.queue_depth if m.scheduler else m.embed_waiting

    def _inflight(self) -> int:
        m = self.model
        return m.scheduler.inflight if m.scheduler else m.embed_waiting

    def ready(self) -> tuple[bool, str]:
        """Ready to take traffic: loaded, not draining, queue not full."""
        if self.draining:
            return False, "draining"
        m = self.model
        if m.scheduler is not None and m.scheduler.full():
            return False, "queue full"
        return True, "ready"

    def inflight(self) -> int:
        return self._inflight()

    def bundle_info(self) -> dict:
        b = self.model.bundle
        return {"name": b.name, "digest": b.digest, "digest12": b.digest12,
                "precision": b.precision, "task": b.task, "runtime": b.runtime,
                "context_length": b.context_length, "path": str(b.path)}

    def list_models(self) -> dict:
        b = self.model.bundle
        created = int(b.path.stat().st_mtime)
        return {"object": "list", "data": [{"id": b.name, "object": "model", "created": created,
                                             "owned_by": "edgegen", "root": b.digest12,
                                             "max_model_len": b.context_length}]}

    async def swap(self, path: str) -> ErrorResult | Bundle:
        """Load the bundle at ``path`` beside the current one, swap, drain and free the old.

        A bundle that fails verification or loading is refused; the current one keeps serving.
        """
        from edge_agent.errors import AgentError

        async with self._swap_lock:
            try:
                bundle = await asyncio.to_thread(open_bundle, path)
                if bundle.task != self.model.bundle.task:
                    return error(400, f"bundle {bundle.name} is a {bundle.task} model; this agent "
                                 f"serves {self.model.bundle.task}", param="path")
                new = await asyncio.to_thread(load_model, bundle, self.settings)
            except AgentError as exc:
                log.warning("bundle swap refused", extra={"path": path, "error": str(exc)})
                return error(400, f"bundle refused: {exc}", param="path", code="bad_bundle")
            old, self.model = self.model, new
            self.metrics.set_bundle(bundle.name, bundle.digest12, bundle.precision)
            log.info("bundle swapped", extra={"old": old.bundle.digest12, "new": bundle.digest12})
        asyncio.get_running_loop().create_task(self._retire(old))
        return bundle

    async def _retire(self, old: LoadedModel) -> None:
        if old.scheduler is not None:
            drained = await old.scheduler.drain(self.settings.drain_timeout)
            if not drained:
                log.warning("old bundle did not drain in time; cancelling its requests")
        await old.close()

    # -- endpoints ------------------------------------------------------------------------

    async def create_chat_completion(self, body: Any, *, source: str = "rest"
                                     ) -> ErrorResult | dict | AsyncIterator[dict]:
        started = time.monotonic()
        result = self._prepare(body, ChatCompletionRequest, CHAT)
        if isinstance(result, ErrorResult):
            return self._count(CHAT, result)
        req, model = result
        if model.template is None:
            return self._count(CHAT, error(
                400, f"model {model.bundle.name} has no chat template; use /v1/completions",
                param="messages"))
        try:
            messages = [{"role": m.role, "content": m.text()} for m in req.messages]
            text = model.template.render(messages, add_generation_prompt=True)
        except (ValueError, TemplateError) as exc:
            return self._count(CHAT, error(400, f"invalid messages: {exc}", param="messages"))
        prompt_ids = model.engine.tokenizer.encode(text, add_special_tokens=False).ids
        return await self._run(CHAT, req, model, prompt_ids, started, source, chat=True)

    async def create_completion(self, body: Any, *, source: str = "rest"
                                ) -> ErrorResult | dict | AsyncIterator[dict]:
        started = time.monotonic()
        result = self._prepare(body, CompletionRequest, COMPLETIONS)
        if isinstance(result, ErrorResult):
            return self._count(COMPLETIONS, result)
        req, model = result
        prompt = req.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
            vocab = model.engine.tokenizer.get_vocab_size()
            if any(not isinstance(t, int) or t < 0 or t >= vocab for t in prompt):
                return self._count(COMPLETIONS, error(
                    400, f"prompt token ids must lie in [0, {vocab})", param="prompt"))
            prompt_ids = list(prompt)
        else:
            text = prompt[0] if isinstance(prompt, list) else prompt
            prompt_ids = model.engine.tokenizer.encode(text, add_special_tokens=True).ids
        return await self._run(COMPLETIONS, req, model, prompt_ids, started, source, chat=False)

    async def create_embedding(self, body: Any, *, source: str = "rest") -> ErrorResult | dict:
        started = time.monotonic()
        model = self.model
        if not isinstance(body, dict):
            return self._count(EMBEDDINGS, error(400, "the request body must be a JSON object"))
        try:
            req = EmbeddingRequest.model_validate(body)
        except ValidationError as exc:
            return self._count(EMBEDDINGS, validation_error(exc))
        if model.generates:
            return self._count(EMBEDDINGS, error(
                400, f"model {model.bundle.name} generates text; embeddings need a "
                "feature-extraction bundle", param="model"))
        if req.model and req.model != model.bundle.name:
            return self._count(EMBEDDINGS, _unknown_model(req.model, model.bundle.name))
        texts = [req.input] if isinstance(req.input, str) else list(req.input)
        for i, t in enumerate(texts):
            n = model.engine.count_tokens(t)
            if n > model.engine.context_length:
                return self._count(EMBEDDINGS, error(
                    400, f"input[{i}] has {n} tokens; the model's context length is "
                    f"{model.engine.context_length}", param="input", code="context_length_exceeded"))
        if model.embed_waiting >= self.settings.max_concurrency + self.settings.queue_size:
            return self._count(EMBEDDINGS, _queue_full(1))  # an embedding takes milliseconds
        model.embed_waiting += 1
        try:
            async with model.embed_slots:
                vectors, tokens = await asyncio.to_thread(model.engine.embed, texts)
        except Exception as exc:  # GenerationError and anything the runtime raised
            log.error("embedding failed", extra={"error": str(exc)})
            return self._count(EMBEDDINGS, error(500, f"embedding failed: {exc}"))
        finally:
            model.embed_waiting -= 1
        self.metrics.prompt_tokens.inc(tokens)
        self.metrics.request_duration.labels(EMBEDDINGS).observe(time.monotonic() - started)
        self._count(EMBEDDINGS, None)
        if req.encoding_format == "base64":
            import base64

            data = [base64.b64encode(v.tobytes()).decode() for v in vectors]
        else:
            data = [v.tolist() for v in vectors]
        return {"object": "list", "model": model.bundle.name,
                "data": [{"object": "embedding", "index": i, "embedding": e}
                         for i, e in enumerate(data)],
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    # -- shared ---------------------------------------------------------------------------

    def _count(self, endpoint: str, result: ErrorResult | None):
        self.metrics.requests.labels(endpoint, str(result.status if result else 200)).inc()
        return result

    def _prepare(self, body: Any, model_cls, endpoint: str):
        model = self.model
        if not isinstance(body, dict):
            return error(400, "the request body must be a JSON object")
        try:
            req = model_cls.model_validate(body)
        except ValidationError as exc:
            return validation_error(exc)
        bad = req.unsupported()
        if bad:
            return error(400, f"parameter {bad} is not supported by this server", param=bad,
                         code="unsupported_parameter")
        if not model.generates:
            return error(400, f"model {model.bundle.name} is an embedding model; use "
                         "/v1/embeddings", param="model")
        if req.model and req.model != model.bundle.name:
            return _unknown_model(req.model, model.bundle.name)
        return req, model

    async def _run(self, endpoint: str, req, model: LoadedModel, prompt_ids: list[int],
             started: float, source: str, *, chat: bool):
        context = model.engine.context_length
        n_prompt = len(prompt_ids)
        if n_prompt == 0:
            return self._count(endpoint, error(400, "the prompt is empty", param="prompt"))
        if n_prompt >= context:
            return self._count(endpoint, error(
                400, f"the prompt has {n_prompt} tokens; the model's context length is {context} "
                "(leave room for at least one generated token)",
                param="messages" if chat else "prompt", code="context_length_exceeded"))
        wanted = req.requested_max_tokens()
        if wanted is not None and n_prompt + wanted > context:
            param = "max_completion_tokens" if chat and req.max_completion_tokens else "max_tokens"
            return self._count(endpoint, error(
                400, f"{param} {wanted} plus the prompt's {n_prompt} tokens exceeds the model's "
                f"context length of {context}", param=param, code="context_length_exceeded"))
        max_tokens = wanted or min(self.settings.max_tokens_default, context - n_prompt)
        temperature = 1.0 if req.temperature is None else req.temperature
        params = SamplingParams(
            max_tokens=max_tokens, temperature=temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            top_k=0 if req.top_k in (None, -1) else req.top_k,
            seed=req.seed, stop=req.stop_list(), ignore_eos=req.ignore_eos)
        handle = model.scheduler.try_submit(prompt_ids, params)
        if handle is None:
            return self._count(endpoint, _queue_full(model.scheduler.retry_after_s()))
        self.metrics.prompt_tokens.inc(n_prompt)
        request_id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        created = int(time.time())
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        meta = _Meta(endpoint, request_id, created, model.bundle.name, n_prompt, started, chat)
        stream = _generate(self.metrics, model, handle, started)
        log.debug("request admitted", extra={"id": request_id, "source": source,
                                              "prompt_tokens": n_prompt})
        if req.stream:
            self._count(endpoint, None)
            return ChunkStream(_stream_chunks(self.metrics, meta, stream, include_usage), handle)
        return await _collect(self, meta, stream)


def _unknown_model(asked: str, served: str) -> ErrorResult:
    return error(404, f"model {asked!r} is not served here; this agent serves {served!r}",
                 param="model", code="model_not_found")


def _queue_full(retry_after: int) -> ErrorResult:
    return error(429, "the agent's queue is full; retry shortly", code="queue_full",
                 headers={"Retry-After": str(retry_after)})


@dataclass
class _Meta:
    endpoint: str
    id: str
    created: int
    model: str
    prompt_tokens: int
    started: float
    chat: bool

    def usage(self, completion_tokens: int) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": self.prompt_tokens + completion_tokens}

    def envelope(self, obj: str, choices: list[dict]) -> dict:
        """The fields every response object and chunk of this request shares."""
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": None, "choices": choices}


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
        if not outcome.completion_tokens:  # ended by the scheduler: EOS counts, as in vLLM
            state = handle.state
            outcome.completion_tokens = len(state.generated) if state is not None else 0
        yield outcome
    finally:
        handle.cancel()
        n = handle.state.generated if handle.state is not None else []
        metrics.generated_tokens.inc(len(n))
        if first_at is not None and consumed > 1:
            metrics.tpot.observe((last_at - first_at) / (consumed - 1))


async def _collect(serving: OpenAIServing, meta: _Meta, stream) -> ErrorResult | dict:
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
    serving.metrics.request_duration.labels(meta.endpoint).observe(time.monotonic() - meta.started)
    if outcome is None or outcome.error:
        return serving._count(meta.endpoint, error(
            500, f"generation failed: {outcome.error if outcome else 'cancelled'}"))
    serving._count(meta.endpoint, None)
    text = "".join(parts)
    if meta.chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": text},
                  "logprobs": None, "finish_reason": outcome.finish_reason}
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": text, "logprobs": None,
                  "finish_reason": outcome.finish_reason}
        obj = "text_completion"
    return {**meta.envelope(obj, [choice]), "usage": meta.usage(outcome.completion_tokens)}


async def _stream_chunks(metrics: AgentMetrics, meta: _Meta, stream, include_usage: bool
                         ) -> AsyncIterator[dict]:
    obj = "chat.completion.chunk" if meta.chat else "text_completion"

    def chunk(content: str | None, finish: str | None, role: bool = False) -> dict:
        if meta.chat:
            delta = {}
            if role:
                delta["role"] = "assistant"
            if content is not None:
                delta["content"] = content
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": content or "", "logprobs": None,
                      "finish_reason": finish}
        out = meta.envelope(obj, [choice])
        if include_usage:
            out["usage"] = None
        return out

    try:
        if meta.chat:
            yield chunk("", None, role=True)
        async for item in stream:
            if isinstance(item, _Outcome):
                if item.error:
                    yield error(500, f"generation failed: {item.error}").body
                    return
                yield chunk(None if meta.chat else "", item.finish_reason)
                if include_usage:
                    yield {**meta.envelope(obj, []), "usage": meta.usage(item.completion_tokens)}
                return
            yield chunk(item, None)
    finally:
        await stream.aclose()
        # Recorded here, not by the HTTP layer, so MQTT streams are measured the same way.
        metrics.request_duration.labels(meta.endpoint).observe(time.monotonic() - meta.started)
