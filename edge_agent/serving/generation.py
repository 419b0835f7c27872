"""What chat and text completions share: admission, limits, and turning a sequence's tokens
into a response or a stream of chunks (vLLM's ``serving_engine``).

Token limits: a prompt that does not fit the context is a 400 naming both lengths; an
explicit ``max_tokens`` that would run past the context is a 400 naming the prompt length,
``max_tokens`` and the context; without ``max_tokens`` the agent generates up to
``max_tokens_default`` tokens, clamped to what the context leaves. Backpressure is decided
here, before anything is returned: a full queue is a 429 (type ``rate_limited``) with
``Retry-After``, so REST and MQTT share one queue and one set of limits.

A request may ask for ``n`` choices: each is its own sequence in the scheduler (decoded in
one batch, seeds ``seed``, ``seed + 1``, ...), admitted together or not at all. Output
constraints (``response_format``, ``tools``) are compiled once per request
(``structured``) and each choice gets its own copy.

A stream is an async iterator of chunk dicts, the choices' chunks interleaved as their tokens
come. Each choice's last chunk carries its ``finish_reason``; with
``stream_options.include_usage`` a final chunk with empty ``choices`` carries ``usage``. A
failure mid-stream yields one ``{"error": {...}}`` dict. Closing the iterator (``aclose``)
cancels every choice's generation and frees its slot.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from pydantic import BaseModel, ValidationError

from edge_agent.engine.base import SamplingParams
from edge_agent.engine.grammar import GrammarError
from edge_agent.metrics import AgentMetrics
from edge_agent.scheduler import SequenceHandle
from edge_agent.serving.choices import ChoiceOutput, Delta, Outcome, Piece, RequestMeta
from edge_agent.serving.lifecycle import LoadedModel, ModelHost
from edge_agent.serving.protocol import ErrorResult, error, validation_error
from edge_agent.serving.structured import OutputPlan, compile_output, plan_output
from edge_agent.serving.tool_calls import ToolCallParser
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

    def _prepare(self, body: Any, model_cls) -> tuple[Any, LoadedModel, OutputPlan] | ErrorResult:
        """The request, the model it goes to and what its output must be; or the error."""
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
        plan = plan_output(req)
        if isinstance(plan, ErrorResult):
            return plan
        return req, model, plan

    async def _run(self, req, model: LoadedModel, prompt_ids: list[int], started: float,
                   source: str, plan: OutputPlan, continued: int = 0) -> Result:
        """``continued``: how many of the prompt's last tokens this generation made earlier,
        elsewhere (a resumed stream): counted as generated, in the budget and the usage."""
        n_prompt = len(prompt_ids)
        limits = self._limits(req, model, n_prompt, continued)
        if isinstance(limits, ErrorResult):
            return limits
        n, top = req.n or 1, req.top_logprob_count()
        picking = await _picking(model, plan, n, top)
        if isinstance(picking, ErrorResult):
            return picking
        vocab, constraints = picking
        params = SamplingParams(
            max_tokens=limits, temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            top_k=0 if req.top_k in (None, -1) else req.top_k,
            seed=req.seed, stop=req.stop_list(), ignore_eos=req.ignore_eos, logprobs=top)
        scheduler = model.scheduler
        if scheduler.room() < n:  # all choices or none
            return queue_full(scheduler.retry_after_s())
        handles = [scheduler.try_submit(prompt_ids, _choice_params(params, i),
                                        cache_salt=req.cache_salt,
                                        constraint=constraints[i] if constraints else None)
                   for i in range(n)]
        self.metrics.prompt_tokens.inc(n_prompt)
        meta = RequestMeta(self.endpoint, ("chatcmpl-" if self.chat else "cmpl-") + uuid.uuid4().hex,
                           int(time.time()), model.bundle.name, n_prompt - continued, started,
                           self.chat, logprobs=top is not None, continued=continued)
        choices = [_Choice(ChoiceOutput(i, ToolCallParser(plan.tool_mode) if plan.tool_mode
                                        else None, vocab),
                           _generate(self.metrics, model, handle, started))
                   for i, handle in enumerate(handles)]
        log.debug("request admitted", extra={"id": meta.id, "source": source,
                                              "prompt_tokens": n_prompt, "n": n})
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return ChunkStream(_stream_chunks(self.metrics, meta, choices, include_usage), handles)
        return await _collect(self.metrics, meta, choices)

    def _limits(self, req, model: LoadedModel, n_prompt: int,
                continued: int = 0) -> int | ErrorResult:
        """How many tokens to generate: the request's max_tokens less what it ``continued``,
        or the 400 when the prompt or max_tokens do not fit."""
        context = model.engine.context_length
        if continued:   # the budget of the generation being resumed, less what it made
            whole = self._limits(req, model, n_prompt - continued)
            if isinstance(whole, ErrorResult):
                return whole
            if whole <= continued:
                return error(400, f"the resumed message already holds {continued} tokens, all "
                             f"the {whole} this request may generate", param="max_tokens")
            return whole - continued
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
        return wanted or min(self.settings.max_tokens_default, context - n_prompt)


async def _picking(model: LoadedModel, plan: OutputPlan, n: int, top: int | None):
    """What picking each token needs: (the vocabulary, one compiled constraint per choice or
    None), or the 400 when the engine cannot pick under a grammar or the grammar is refused."""
    if plan.grammar is None and top is None:
        return None, None
    param = "logprobs" if plan.grammar is None else "tools" if plan.tools else "response_format"
    if not model.engine.picks_tokens:
        return error(400, f"{param} is not supported by this model's engine "
                     f"({type(model.engine).__name__} samples inside its runtime)",
                     param=param, code="unsupported_parameter")
    try:
        vocab = await model.vocabulary()
    except GrammarError as exc:
        return error(400, str(exc), param=param, code="unsupported_parameter")
    if plan.grammar is None:
        return vocab, None
    constraint = await asyncio.to_thread(compile_output, plan, vocab)
    if isinstance(constraint, ErrorResult):
        return constraint
    return vocab, [constraint] + [constraint.copy() for _ in range(n - 1)]


def _choice_params(params: SamplingParams, index: int) -> SamplingParams:
    """Choice ``index``'s sampling: its own seed (``seed + index``), so seeded choices differ
    from each other and repeat across requests."""
    if index == 0 or params.seed is None or params.seed < 0:
        return params
    return dataclasses.replace(params, seed=params.seed + index)


@dataclasses.dataclass
class _Choice:
    output: ChoiceOutput
    pieces: AsyncIterator   # Piece items, then the Outcome


class ChunkStream:
    """The chunks of one streamed response, as an async iterator. ``ready()`` says whether
    more tokens are already waiting, so that a writer can send them together in one write."""

    def __init__(self, chunks: AsyncIterator[dict], handles: list[SequenceHandle]):
        self._chunks = chunks
        self._handles = handles

    def __aiter__(self) -> ChunkStream:
        return self

    async def __anext__(self) -> dict:
        return await self._chunks.__anext__()

    def ready(self) -> bool:
        return any(not h.events.empty() for h in self._handles)

    async def aclose(self) -> None:
        await self._chunks.aclose()


async def _generate(metrics: AgentMetrics, model: LoadedModel, handle: SequenceHandle,
                    started: float):
    """Pieces of one sequence's text; the last item is its Outcome. Cancels on close."""
    detok = IncrementalDetokenizer(model.engine.tokenizer, handle.params.stop)
    outcome = Outcome()
    first_at = last_at = None
    consumed = 0
    logprobs = []   # of tokens whose text is not out yet
    try:
        async for event in handle:
            if event.token_id is not None:
                consumed += 1
                now = time.monotonic()
                if first_at is None:
                    first_at = now
                    metrics.ttft.observe(now - started)
                last_at = now
                if event.logprob is not None:
                    logprobs.append(event.logprob)
                text = detok.add(event.token_id)
                if detok.stopped:
                    handle.cancel()
                    outcome.finish_reason = "stop"
                    outcome.completion_tokens = consumed  # not what was decoded past the stop
                    if text or logprobs:
                        yield Piece(text, logprobs)
                    break
                if text:
                    yield Piece(text, logprobs)
                    logprobs = []
                continue
            if event.error:
                outcome.error = event.error
            else:
                tail = detok.flush()
                if tail or logprobs:
                    yield Piece(tail, logprobs)
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


async def _interleaved(choices: list[_Choice]) -> AsyncIterator[tuple[_Choice, Any]]:
    """(choice, item) as each choice's items come; one choice is read directly."""
    if len(choices) == 1:
        async for item in choices[0].pieces:
            yield choices[0], item
        return
    waiting = {asyncio.ensure_future(c.pieces.__anext__()): c for c in choices}
    try:
        while waiting:
            done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            for future in done:
                choice = waiting.pop(future)
                try:
                    item = future.result()
                except StopAsyncIteration:
                    continue
                yield choice, item
                waiting[asyncio.ensure_future(choice.pieces.__anext__())] = choice
    finally:
        for future in waiting:
            future.cancel()
        await asyncio.gather(*waiting, return_exceptions=True)


async def _close(merged, choices: list[_Choice]) -> None:
    """Close the merge first (it stops reading the choices), then each choice (cancelling
    its generation and freeing its slot)."""
    await merged.aclose()
    for choice in choices:
        await choice.pieces.aclose()


async def _collect(metrics: AgentMetrics, meta: RequestMeta, choices: list[_Choice]
                   ) -> ErrorResult | dict:
    merged = _interleaved(choices)
    try:
        async for choice, item in merged:
            if isinstance(item, Outcome):
                choice.output.end(item)
            else:
                choice.output.read(item)
    finally:
        await _close(merged, choices)
    metrics.request_duration.labels(meta.endpoint).observe(time.monotonic() - meta.started)
    for choice in choices:
        outcome = choice.output.outcome
        if outcome is None or outcome.error:
            return error(500, f"generation failed: {outcome.error if outcome else 'cancelled'}")
    return meta.response([c.output for c in choices])


async def _stream_chunks(metrics: AgentMetrics, meta: RequestMeta, choices: list[_Choice],
                         include_usage: bool) -> AsyncIterator[dict]:
    merged = _interleaved(choices)
    try:
        if meta.chat:
            for choice in choices:
                yield meta.chunk(choice.output, Delta(content=""), None, include_usage, role=True)
        async for choice, item in merged:
            out = choice.output
            if isinstance(item, Outcome):
                if item.error:
                    yield error(500, f"generation failed: {item.error}").body
                    return
                delta = out.end(item)
                yield meta.chunk(out, delta, out.finish_reason, include_usage)
                continue
            delta = out.read(item)
            if delta:
                yield meta.chunk(out, delta, None, include_usage)
        if include_usage:
            yield meta.usage_chunk([c.output.outcome for c in choices])
    finally:
        await _close(merged, choices)
        # Recorded here, not by the HTTP layer, so MQTT streams are measured the same way.
        metrics.request_duration.labels(meta.endpoint).observe(time.monotonic() - meta.started)
