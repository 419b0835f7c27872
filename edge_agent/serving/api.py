"""``OpenAIServing``: the agent's OpenAI endpoints behind one object, for the HTTP router and
the MQTT bridge alike.

Each endpoint's logic lives in its own module (``chat``, ``completion``, ``embedding``,
``models``); this object holds them and is the one place where a request's outcome is
counted in ``edgegen_requests_total``: an ``ErrorResult`` by its status, anything else as
200 (a stream is counted when it starts; a failure inside it is an error event).
"""

from __future__ import annotations

from typing import Any

from edge_agent.metrics import AgentMetrics
from edge_agent.serving.chat import CHAT, RESUME_HEADER, ChatServing
from edge_agent.serving.completion import COMPLETIONS, CompletionServing
from edge_agent.serving.embedding import EMBEDDINGS, EmbeddingServing
from edge_agent.serving.generation import Result
from edge_agent.serving.lifecycle import ModelHost
from edge_agent.serving.models import ModelsServing
from edge_agent.serving.protocol import ErrorResult
from edge_agent.settings import AgentSettings


__all__ = ["RESUME_HEADER", "OpenAIServing"]


class OpenAIServing:
    def __init__(self, settings: AgentSettings, host: ModelHost, metrics: AgentMetrics):
        self.settings = settings
        self.host = host
        self.metrics = metrics
        self.chat = ChatServing(settings, host, metrics)
        self.completion = CompletionServing(settings, host, metrics)
        self.embedding = EmbeddingServing(settings, host, metrics)
        self.models = ModelsServing(host)

    async def create_chat_completion(self, body: Any, *, source: str = "rest",
                                     resume: bool = False) -> Result:
        return self._count(CHAT, await self.chat.create_chat_completion(body, source=source,
                                                                        resume=resume))

    async def create_completion(self, body: Any, *, source: str = "rest") -> Result:
        return self._count(COMPLETIONS, await self.completion.create_completion(body, source=source))

    async def create_embedding(self, body: Any, *, source: str = "rest") -> ErrorResult | dict:
        return self._count(EMBEDDINGS, await self.embedding.create_embedding(body, source=source))

    def _count(self, endpoint: str, result):
        status = result.status if isinstance(result, ErrorResult) else 200
        self.metrics.requests.labels(endpoint, str(status)).inc()
        return result
