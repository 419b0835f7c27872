"""Pick and load the engine a bundle needs, with the device's providers and thread count."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from edge_agent.engine import cpu_fit
from edge_agent.engine.ort import providers_for
from edge_agent.errors import ModelLoadError

if TYPE_CHECKING:
    from edge_agent.bundle import Bundle
    from edge_agent.settings import AgentSettings


def thread_count(settings: AgentSettings) -> int:
    """Intra-op threads: as configured, else every core this process may run on."""
    if settings.threads:
        return settings.threads
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def load_engine(bundle: Bundle, settings: AgentSettings):
    """The engine for ``bundle``: a GenerationEngine, or an EmbeddingEngine for encoders.

    Engines are imported here, lazily, so an agent loads only the runtime its bundle needs.
    ModelLoadError for a bundle this CPU would compute wrong (``cpu_fit``).
    """
    if settings.device == "cpu":
        why = cpu_fit.check(bundle.manifest.get("quantization"))
        if why:
            raise ModelLoadError(f"bundle {bundle.name} cannot be served on this CPU: {why}")
    providers = providers_for(settings.device)
    threads = thread_count(settings)
    cache_bytes = settings.prefix_cache_mb * 2**20
    if bundle.task == "feature-extraction":
        from edge_agent.engine.embed import EmbeddingEngine

        return EmbeddingEngine(bundle, providers=providers, threads=threads)
    if bundle.runtime == "onnxruntime-genai":
        if settings.device == "cpu" and os.environ.get("EDGEGEN_GENAI_BATCH", "1") != "0":
            from edge_agent.engine.batch import BatchEngine

            return BatchEngine(bundle, threads=threads, providers=providers,
                               prefix_cache_bytes=cache_bytes)
        from edge_agent.engine.genai import GenaiEngine  # GPUs; or EDGEGEN_GENAI_BATCH=0

        return GenaiEngine(bundle, device=settings.device, threads=threads)
    from edge_agent.engine.ort_loop import OrtEngine

    return OrtEngine(bundle, providers=providers, threads=threads, prefix_cache_bytes=cache_bytes)
