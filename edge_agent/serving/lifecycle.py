"""The model's lifecycle, in one place: load, swap, retire, drain.

``ModelHost`` holds the model being served. A swap loads the new bundle beside the old one,
switches atomically and retires the old in the background: it finishes its in-flight
requests (up to ``drain_timeout``) and is freed. A bundle that fails verification or loading
is refused and the current one keeps serving. ``draining`` is the agent's one drain event:
set on SIGTERM (the runner) or shutdown (the app); readiness, Consul and the MQTT shared
group follow it, and ``wait_idle`` ends the drain when the last request is done.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from edge_agent.bundle import Bundle
from edge_agent.bundle.signing import load_trust, open_trusted
from edge_agent.engine.grammar import TokenVocabulary
from edge_agent.engine.loader import load_engine
from edge_agent.errors import AgentError
from edge_agent.metrics import AgentMetrics
from edge_agent.scheduler import Scheduler, wait_for_event
from edge_agent.serving.protocol import ErrorResult, error
from edge_agent.settings import AgentSettings
from edge_agent.text.chat_template import ChatTemplate

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    """A bundle with its engine, scheduler (generation) and chat template, ready to serve."""

    bundle: Bundle
    engine: Any
    scheduler: Scheduler | None
    template: ChatTemplate | None
    embed_slots: asyncio.Semaphore | None = None
    embed_waiting: int = 0
    _embed_idle: asyncio.Event = field(default_factory=asyncio.Event)
    _vocabulary: TokenVocabulary | None = None
    _vocabulary_lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def __post_init__(self) -> None:
        self._embed_idle.set()

    @property
    def generates(self) -> bool:
        return self.scheduler is not None

    @property
    def queue_depth(self) -> int:
        return self.scheduler.queue_depth if self.scheduler else self.embed_waiting

    @property
    def inflight(self) -> int:
        return self.scheduler.inflight if self.scheduler else self.embed_waiting

    @contextlib.asynccontextmanager
    async def embedding_slot(self) -> AsyncIterator[None]:
        """Hold one of the ``max_concurrency`` embedding slots (waiting counts as in flight)."""
        self.embed_waiting += 1
        self._embed_idle.clear()
        try:
            async with self.embed_slots:
                yield
        finally:
            self.embed_waiting -= 1
            if not self.embed_waiting:
                self._embed_idle.set()

    async def vocabulary(self) -> TokenVocabulary:
        """The tokenizer as llguidance reads it (grammars, logprobs' token bytes), built in a
        worker thread on first use: about 0.3 s for a 49k vocabulary, paid only by models
        asked for structured output or logprobs."""
        async with self._vocabulary_lock:
            if self._vocabulary is None:
                engine = self.engine
                self._vocabulary = await asyncio.to_thread(
                    TokenVocabulary, engine.tokenizer, engine.eos_token_ids)
        return self._vocabulary

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until nothing is queued or running; False if ``timeout`` passed first."""
        if self.scheduler is not None:
            return await self.scheduler.drain(timeout)
        return await wait_for_event(self._embed_idle, timeout)

    async def close(self) -> None:
        if self.scheduler is not None:
            await self.scheduler.close()
        await asyncio.to_thread(self.engine.close)


def load_model(bundle: Bundle, settings: AgentSettings) -> LoadedModel:
    """Load ``bundle``'s engine (blocking: run it in a thread from async code)."""
    return model_around(bundle, load_engine(bundle, settings), settings)


def model_around(bundle: Bundle, engine, settings: AgentSettings) -> LoadedModel:
    """A ``LoadedModel`` serving ``engine``: its scheduler (generation) or embedding slots."""
    if bundle.task == "feature-extraction":
        return LoadedModel(bundle, engine, None, None,
                           embed_slots=asyncio.Semaphore(settings.max_concurrency))
    scheduler = Scheduler(engine, max_concurrency=settings.max_concurrency,
                          queue_size=settings.queue_size,
                          stream_interval=settings.stream_interval_ms / 1000)
    return LoadedModel(bundle, engine, scheduler, ChatTemplate.from_bundle(bundle))


@dataclass(frozen=True)
class Load:
    """The Gateway API Inference Extension's model-server load figures: requests queued,
    requests being decoded, and the cache's fill (0-1; here the prefix cache's bytes over its
    budget: this engine's reusable KV)."""

    waiting: int
    running: int
    cache_usage: float


class ModelHost:
    """The model the agent serves now, and its replacement, retirement and drain."""

    def __init__(self, settings: AgentSettings, model: LoadedModel, metrics: AgentMetrics):
        self.settings = settings
        self.model = model
        self.metrics = metrics
        self.draining = asyncio.Event()
        self._swap_lock = asyncio.Lock()
        self._retiring: set[asyncio.Task] = set()   # referenced until done (asyncio keeps weak refs)
        self.trust = load_trust(settings.trust_keys)  # None: bundles are not signature-checked
        metrics.set_bundle(model.bundle.name, model.bundle.digest12, model.bundle.precision)
        metrics.queue_depth.set_function(lambda: self.model.queue_depth)
        metrics.inflight.set_function(lambda: self.model.inflight)
        metrics.requests_waiting.set_function(lambda: self.load().waiting)
        metrics.requests_running.set_function(lambda: self.load().running)
        metrics.cache_usage.set_function(lambda: self.load().cache_usage)

    def load(self) -> Load:
        """How busy the served model is, as a router or an llm-d scheduler reads it."""
        m = self.model
        waiting = m.queue_depth
        cache = getattr(m.engine, "prefix_cache", None)
        usage = (cache.bytes / cache.budget_bytes
                 if cache is not None and cache.enabled and cache.budget_bytes else 0.0)
        return Load(waiting, m.inflight - waiting, min(1.0, usage))

    def begin_drain(self) -> None:
        """Stop attracting work: readiness fails from now on; in-flight requests finish."""
        self.draining.set()

    def ready(self) -> tuple[bool, str]:
        """Ready to take traffic: loaded, not draining, queue not full."""
        if self.draining.is_set():
            return False, "draining"
        m = self.model
        if m.scheduler is not None and m.scheduler.full():
            return False, "queue full"
        return True, "ready"

    def inflight(self) -> int:
        return self.model.inflight

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until the served model has nothing in flight; False if ``timeout`` passed."""
        return await self.model.wait_idle(timeout)

    async def swap(self, path: str) -> ErrorResult | Bundle:
        """Load the bundle at ``path`` beside the current one, swap, drain and free the old.

        A bundle that fails verification, the trust policy (``--trust-key``: signed by a
        trusted key) or loading is refused; the current one keeps serving.
        """
        async with self._swap_lock:
            try:
                bundle = await asyncio.to_thread(open_trusted, path, self.trust)
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
        task = asyncio.get_running_loop().create_task(self._retire(old))
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)
        return bundle

    async def _retire(self, old: LoadedModel) -> None:
        if not await old.wait_idle(self.settings.drain_timeout):
            log.warning("old bundle did not drain in time; cancelling its requests")
        await old.close()

    async def close(self) -> None:
        """Free the served model and any that are still retiring."""
        if self._retiring:
            await asyncio.gather(*self._retiring, return_exceptions=True)
        await self.model.close()
