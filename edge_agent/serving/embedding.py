"""``POST /v1/embeddings``: one vector per input, from a feature-extraction bundle."""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from typing import Any

from edge_agent.metrics import AgentMetrics
from edge_agent.serving.generation import (
    off_loop_if_large,
    parse_body,
    queue_full,
    unknown_model,
)
from edge_agent.serving.lifecycle import ModelHost
from edge_agent.serving.protocol import (
    EmbeddingData,
    EmbeddingRequest,
    EmbeddingResponse,
    EmbeddingUsage,
    ErrorResult,
    error,
)
from edge_agent.settings import AgentSettings

log = logging.getLogger(__name__)

EMBEDDINGS = "/v1/embeddings"


class EmbeddingServing:
    def __init__(self, settings: AgentSettings, host: ModelHost, metrics: AgentMetrics):
        self.settings = settings
        self.host = host
        self.metrics = metrics

    async def create_embedding(self, body: Any, *, source: str = "rest") -> ErrorResult | dict:
        started = time.monotonic()
        model = self.host.model
        req = parse_body(body, EmbeddingRequest)
        if isinstance(req, ErrorResult):
            return req
        if model.generates:
            return error(400, f"model {model.bundle.name} generates text; embeddings need a "
                         "feature-extraction bundle", param="model")
        if req.model and req.model != model.bundle.name:
            return unknown_model(req.model, model.bundle.name)
        texts = [req.input] if isinstance(req.input, str) else list(req.input)
        counts = await off_loop_if_large(sum(map(len, texts)), _count_tokens, model.engine,
                                         texts)
        for i, n in enumerate(counts):
            if n > model.engine.context_length:
                return error(400, f"input[{i}] has {n} tokens; the model's context length is "
                             f"{model.engine.context_length}", param="input",
                             code="context_length_exceeded")
        if model.embed_waiting >= self.settings.max_concurrency + self.settings.queue_size:
            return queue_full(1)  # an embedding takes milliseconds
        try:
            async with model.embedding_slot():
                vectors, tokens = await asyncio.to_thread(model.engine.embed, texts)
        except Exception as exc:  # GenerationError and anything the runtime raised
            log.error("embedding failed", extra={"error": str(exc)})
            return error(500, f"embedding failed: {exc}")
        self.metrics.prompt_tokens.inc(tokens)
        self.metrics.request_duration.labels(EMBEDDINGS).observe(time.monotonic() - started)
        if req.encoding_format == "base64":
            data = [base64.b64encode(v.tobytes()).decode() for v in vectors]
        else:
            data = [v.tolist() for v in vectors]
        return EmbeddingResponse(
            model=model.bundle.name,
            data=[EmbeddingData(index=i, embedding=e) for i, e in enumerate(data)],
            usage=EmbeddingUsage(prompt_tokens=tokens, total_tokens=tokens)).model_dump()


def _count_tokens(engine, texts: list[str]) -> list[int]:
    return [engine.count_tokens(t) for t in texts]
