"""``GET /v1/models`` (and ``/v1/models/{id}``), and the bundle the agent serves
(``GET /edgegen/v1/bundle``)."""

from __future__ import annotations

from edge_agent.serving.generation import unknown_model
from edge_agent.serving.lifecycle import ModelHost
from edge_agent.serving.protocol import ErrorResult, ModelCard, ModelList


class ModelsServing:
    def __init__(self, host: ModelHost):
        self.host = host

    def _card(self) -> ModelCard:
        b = self.host.model.bundle
        return ModelCard(id=b.name, created=int(b.path.stat().st_mtime), root=b.digest12,
                         max_model_len=b.context_length)

    def list_models(self) -> dict:
        return ModelList(data=[self._card()]).model_dump()

    def retrieve_model(self, model_id: str) -> dict | ErrorResult:
        """The served model's card, as ``list_models`` has it; a 404 for any other id (the
        agent serves one model, so that is the only id it can describe)."""
        card = self._card()
        return card.model_dump() if model_id == card.id else unknown_model(model_id, card.id)

    def bundle_info(self) -> dict:
        b = self.host.model.bundle
        return {"name": b.name, "digest": b.digest, "digest12": b.digest12,
                "precision": b.precision, "task": b.task, "runtime": b.runtime,
                "context_length": b.context_length, "path": str(b.path)}

    def prefix_cache(self):
        """The served model's prefix cache, or None (embeddings, GPUs, --prefix-cache-mb 0)."""
        cache = getattr(self.host.model.engine, "prefix_cache", None)
        return cache if cache is not None and cache.enabled else None
