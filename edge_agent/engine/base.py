"""The interface every generation engine implements, and the data it works on.

An engine owns a loaded model and knows how to prefill a prompt and decode one token at a
time for several sequences; it knows nothing of HTTP, queues or text. The scheduler drives
it from a single worker thread, so engines need not be thread-safe. Implementations:

- ``batch.BatchEngine``      runtime "onnxruntime-genai" on CPU (the builder's fused graph,
                              driven by onnxruntime: chunked prefill, prefix cache, batching)
- ``genai.GenaiEngine``      runtime "onnxruntime-genai" on GPUs (onnxruntime-genai's loop)
- ``ort_loop.OrtEngine``     runtime "onnxruntime" (optimum exports; numpy loop)
- ``embed.EmbeddingEngine``  task "feature-extraction"

``loader.load_engine`` picks one. This module imports no runtime: onnxruntime is owned by
``ort`` and onnxruntime-genai by ``genai`` (import-linter contracts in pyproject.toml).
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tokenizers import Tokenizer

from edge_agent.engine.prefix_cache import PrefixCache
from edge_agent.errors import BundleFormatError, GenerationError

if TYPE_CHECKING:
    from edge_agent.bundle import Bundle


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token. ``temperature == 0`` means greedy."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0                    # 0 = no top-k cut
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None       # None: none; k: the chosen token's and the k likeliest


    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1


@dataclass
class SequenceState:
    """One sequence inside an engine: the engine keeps its own per-sequence data in ``data``."""

    prompt_ids: list[int]
    params: SamplingParams
    data: Any = None
    generated: list[int] = field(default_factory=list)
    cached_tokens: int = 0   # prompt tokens taken from the prefix cache, not read again
    constraint: Any = None   # grammar.Constraint: the tokens each step may pick
    logprobs: list[TokenLogprob] = field(default_factory=list)  # one per generated token


@dataclass(frozen=True)
class TokenLogprob:
    """The model's log-probability of a picked token, and of the likeliest ``top`` ones
    (raw: before temperature, top-k/p and grammar masks, as vLLM reports them)."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


# What a step gives each sequence: its next token, None while its prompt is still being read
# (chunked prefill), or the error that ended it alone (its prefill or its sampler failed). An
# engine raises only for what fails the whole step (the batched forward pass), which ends
# every sequence in it.
StepResult = int | GenerationError | None


def step_one(seq: SequenceState, next_token) -> StepResult:
    """``next_token(seq)``, with a failure confined to this one sequence: the agent's own
    errors keep their message, anything else is a GenerationError (the caller logs it)."""
    try:
        return next_token(seq)
    except GenerationError as exc:
        return exc
    except Exception as exc:  # a runtime's or numpy's error inside one sequence's work
        error = GenerationError(f"{type(exc).__name__}: {exc}")
        error.__cause__ = exc
        return error


class GenerationEngine(ABC):
    """A loaded text-generation model."""

    tokenizer: Tokenizer
    context_length: int
    eos_token_ids: frozenset[int]
    prefix_cache: PrefixCache | None = None   # engines that reuse prompt prefixes set one
    # Whether the agent picks each token (sampling.pick): only then can a grammar mask the
    # choice and logprobs be reported. onnxruntime-genai's loop picks inside C++.
    picks_tokens: bool = True

    @abstractmethod
    def start(self, prompt_ids: list[int], params: SamplingParams, *,
              cache_salt: str | None = None) -> SequenceState:
        """Allocate a sequence for ``prompt_ids``; the prompt is read by the next step(s).
        ``cache_salt`` keeps its prefix-cache entries apart from other tenants' (engines
        without a prefix cache ignore it)."""

    @abstractmethod
    def step(self, seqs: list[SequenceState]) -> list[StepResult]:
        """The next token of every sequence in ``seqs`` (batched where the engine can), or,
        for a sequence that failed on its own, its error (``step_one``)."""

    def release(self, seq: SequenceState) -> None:
        """Free what the engine holds for ``seq`` (KV cache)."""
        seq.data = None

    def has_idle_work(self) -> bool:
        """Whether ``idle_step`` has something to do (e.g. fill the prefix cache)."""
        return False

    def idle_step(self) -> None:
        """A short piece of background work, run only while no request is queued or running;
        a request that arrives meanwhile waits for at most one such piece."""

    def close(self) -> None:
        """Free the model."""


def generate(engine: GenerationEngine, prompts: list[list[int]],
             params: SamplingParams) -> list[list[int] | GenerationError]:
    """Every prompt started at once and stepped together until it has ``params.max_tokens``
    tokens, as the scheduler steps requests that arrive together (for validation, tests and
    benchmarks: no EOS or stop handling). A sequence that fails gives its error."""
    seqs = [engine.start(ids, params) for ids in prompts]
    out: dict[int, list[int] | GenerationError] = {}
    try:
        while live := [s for s in seqs if id(s) not in out]:
            for seq, token in zip(live, engine.step(live)):
                if isinstance(token, GenerationError):
                    out[id(seq)] = token
                elif token is not None:  # None: its prompt is still being read
                    seq.generated.append(token)
                    if len(seq.generated) >= params.max_tokens:
                        out[id(seq)] = seq.generated
    finally:
        for seq in seqs:
            engine.release(seq)
    return [out[id(s)] for s in seqs]


def load_tokenizer(bundle: Bundle) -> Tokenizer:
    """The bundle's tokenizer, encoding exactly the text it is given: ``tokenizer.json`` may
    carry padding and truncation settings (all-MiniLM-L6-v2's pads every input to 128 tokens),
    and the agent must neither pool padding as if it were text nor cut a prompt silently."""
    if not bundle.has_file("tokenizer.json"):
        raise BundleFormatError(f"bundle {bundle.path} has no tokenizer.json")
    tokenizer = Tokenizer.from_file(str(bundle.file("tokenizer.json")))
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return tokenizer


def eos_token_ids(bundle: Bundle) -> frozenset[int]:
    """Every id that ends a sequence: the manifest's, else generation_config/config's."""
    ids = (bundle.manifest.get("generation") or {}).get("eos_token_ids")
    if not ids:
        for name in ("generation_config.json", "config.json"):
            if bundle.has_file(name):
                value = json.loads(bundle.file(name).read_text()).get("eos_token_id")
                if value is not None:
                    ids = value if isinstance(value, list) else [value]
                    break
    return frozenset(int(i) for i in ids or [])
