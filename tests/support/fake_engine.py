"""A deterministic fake engine, and the agent's serving stack built around it without a model.

As vLLM tests its OpenAI serving layer: the engine is the one boundary swapped for a fake;
everything above it is the real code (``Scheduler``, ``LoadedModel``, ``ModelHost``,
``OpenAIServing``, the chat template, the incremental detokenizer, ``AgentMetrics``). The
fake engine holds a real ``tokenizers.Tokenizer`` (the ``bpe_tokenizer_dir`` fixture), so
prompts tokenize and generated tokens detokenize into text as they would on a real model.

- ``FakeEngine``           a ``GenerationEngine`` that generates a scripted reply per prompt
- ``Reply``                what it generates: a text's tokens, then EOS (or the text again)
- ``FakeEmbeddingEngine``  the embedding engine's interface (count_tokens, embed)
- ``write_fake_bundle``    a real, verifiable bundle directory holding the tokenizer files
- ``serving_stack``        ``LoadedModel`` + ``ModelHost`` + ``OpenAIServing`` around an
                           engine, built as ``lifecycle.load_model`` builds them; closed after
"""

from __future__ import annotations

import contextlib
import hashlib
import shutil
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from edge_agent.bundle import Bundle, write_bundle
from edge_agent.engine.base import GenerationEngine, SamplingParams, SequenceState
from edge_agent.engine.sampling import pick
from edge_agent.errors import GenerationError
from edge_agent.metrics import AgentMetrics
from edge_agent.serving.api import OpenAIServing
from edge_agent.serving.lifecycle import LoadedModel, ModelHost, model_around
from edge_agent.settings import AgentSettings

EOS_ID = 2                 # <|im_end|> in the bpe_tokenizer fixture, as in SmolLM2
GATE_TIMEOUT_S = 10.0      # a step waits this long for a closed gate, then fails the test

# ChatML, as SmolLM2 writes it (without its default system message).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@dataclass(frozen=True)
class Reply:
    """What the engine generates for a prompt: the tokens of ``text`` then EOS, or, with
    ``eos=False``, the tokens of ``text`` over and over until the scheduler stops it."""

    text: str
    eos: bool = True


class FakeEngine(GenerationEngine):
    """A generation engine with no model: each sequence generates a scripted ``Reply``.

    The reply is the value of the first key of ``replies`` found in the prompt's text
    (special tokens included), else ``default``. Options:

    - ``eos_token_ids``: the ids that end a sequence (the scheduler checks them).
    - ``step_delay``: seconds each step sleeps (decode steps longer than the scheduler's
      ``INLINE_STEP_S`` move off the event loop, as real ones do).
    - ``gate``: a ``threading.Event`` every step waits on. Clear it *before* submitting to
      hold sequences in their first step, which the scheduler runs in a worker thread (the
      event loop stays free); set it to let them go. Clearing it while sequences decode
      would block the loop, since short decode steps run on it.
    - ``fail_at``: a step raises ``failure`` when a sequence in it has generated that many
      tokens (0: the prefill step).

    What happened is recorded: ``prompts`` (the ids each ``start`` got), ``batches`` (the
    size of each step), ``released`` (sequences freed) and ``closed``.
    """

    def __init__(self, tokenizer: Tokenizer, *, context_length: int = 128,
                 replies: Mapping[str, Reply | str] | None = None,
                 default: Reply | str = Reply("Hello there! How are you today?"),
                 eos_token_ids: frozenset[int] | set[int] = frozenset({EOS_ID}),
                 step_delay: float = 0.0, gate: threading.Event | None = None,
                 fail_at: int | None = None,
                 failure: Exception = GenerationError("injected engine failure")):
        self.tokenizer = tokenizer
        self.context_length = context_length
        self.eos_token_ids = frozenset(eos_token_ids)
        self.replies = {k: _reply(v) for k, v in (replies or {}).items()}
        self.default = _reply(default)
        self.step_delay = step_delay
        self.gate = gate
        self.fail_at = fail_at
        self.failure = failure
        self.prompts: list[list[int]] = []
        self.salts: list[str | None] = []   # each start's cache_salt
        self.batches: list[int] = []
        self.released = 0
        self.closed = False
        self._rng = np.random.default_rng(0)

    def reply_for(self, prompt_ids: list[int]) -> Reply:
        text = self.tokenizer.decode(prompt_ids, skip_special_tokens=False)
        return next((r for key, r in self.replies.items() if key in text), self.default)

    def reply_ids(self, reply: Reply) -> list[int]:
        return self.tokenizer.encode(reply.text, add_special_tokens=False).ids

    def start(self, prompt_ids: list[int], params: SamplingParams, *,
              cache_salt: str | None = None) -> SequenceState:
        self.prompts.append(list(prompt_ids))
        self.salts.append(cache_salt)
        reply = self.reply_for(prompt_ids)
        script = self.reply_ids(reply)
        if not script and not reply.eos:
            raise ValueError("a reply without EOS needs text to repeat")
        return SequenceState(prompt_ids=list(prompt_ids), params=params, data=(script, reply.eos))

    def step(self, seqs: list[SequenceState]) -> list[int]:
        if self.gate is not None and not self.gate.wait(GATE_TIMEOUT_S):
            raise RuntimeError(f"FakeEngine: the gate stayed closed for {GATE_TIMEOUT_S} s")
        if self.step_delay:
            time.sleep(self.step_delay)
        if self.fail_at is not None and any(len(s.generated) == self.fail_at for s in seqs):
            raise self.failure
        self.batches.append(len(seqs))
        return [self._next(s) for s in seqs]

    def _next(self, seq: SequenceState) -> int:
        """The scripted token, picked as a real engine picks (``sampling.pick``) from logits
        that favour it by far: a grammar can mask it, logprobs are reported."""
        script, eos = seq.data
        n = len(seq.generated)
        if n < len(script):
            wanted = script[n]
        elif eos:
            wanted = min(self.eos_token_ids)
        else:
            wanted = script[n % len(script)]
        logits = np.zeros(self.tokenizer.get_vocab_size(), dtype=np.float32)
        logits[wanted] = 100.0
        return pick(seq, logits, self._rng)

    def release(self, seq: SequenceState) -> None:
        self.released += 1
        super().release(seq)

    def close(self) -> None:
        self.closed = True


def _reply(value: Reply | str) -> Reply:
    return value if isinstance(value, Reply) else Reply(value)


class FakeEmbeddingEngine:
    """The interface of ``engine.embed.EmbeddingEngine`` without a model: each text's vector
    is a normalised histogram of its token ids (``dim`` buckets), so equal texts embed
    equally. ``fail`` makes ``embed`` raise it."""

    def __init__(self, tokenizer: Tokenizer, *, dim: int = 8, context_length: int = 64,
                 fail: Exception | None = None):
        self.tokenizer = tokenizer
        self.dim = dim
        self.context_length = context_length
        self.fail = fail
        self.calls: list[list[str]] = []
        self.closed = False

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer.encode(text).ids)

    def embed(self, texts: list[str]) -> tuple[np.ndarray, int]:
        self.calls.append(list(texts))
        if self.fail is not None:
            raise self.fail
        vectors = np.zeros((len(texts), self.dim), dtype=np.float32)
        tokens = 0
        for row, enc in enumerate(self.tokenizer.encode_batch(texts)):
            tokens += len(enc.ids)
            for i in enc.ids:
                vectors[row, i % self.dim] += 1.0
        vectors /= np.clip(np.linalg.norm(vectors, axis=-1, keepdims=True), 1e-12, None)
        return vectors, tokens

    def close(self) -> None:
        self.closed = True


# --- the bundle and the serving stack -----------------------------------------------------------

def write_fake_bundle(tokenizer_dir: Path, store: Path, *, name: str = "fake-chatml",
                      task: str = "text-generation", context_length: int = 128,
                      chat_template: str | None = CHATML_TEMPLATE,
                      eos_token_ids: tuple[int, ...] = (EOS_ID,)) -> Bundle:
    """A well-formed bundle (it passes ``open_bundle``) whose only files are the tokenizer's
    and the chat template: what the agent reads besides the model."""
    store.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=".staging-fake-", dir=store))
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy2(tokenizer_dir / f, stage / f)
    manifest = {
        "name": name, "task": task, "runtime": "onnxruntime", "exporter": "fake",
        "source": {"kind": "test", "reference": "tests/support/fake_engine.py",
                   "sha256": hashlib.sha256(name.encode()).hexdigest()},
        "precision": "fp32", "signature": {}, "context_length": context_length,
        "validation": {}, "generation": {"eos_token_ids": list(eos_token_ids)},
    }
    if chat_template is not None:
        (stage / "chat_template.jinja").write_text(chat_template)
        manifest["chat_template"] = "chat_template.jinja"
    return write_bundle(stage, manifest, store)


def fake_model(bundle: Bundle, engine, settings: AgentSettings) -> LoadedModel:
    """A ``LoadedModel`` around ``engine``, built as ``lifecycle.load_model`` builds one."""
    return model_around(bundle, engine, settings)


def agent_settings(bundle: Bundle, **overrides) -> AgentSettings:
    """Settings for a serving stack: streams get every token at once (no 20 ms batching)."""
    values = {"bundle": str(bundle.path), "node": "test-node", "stream_interval_ms": 0,
              "store": bundle.path.parent.parent}
    values.update(overrides)
    return AgentSettings(**values)


@dataclass
class ServingStack:
    """The serving objects of one agent around a fake engine."""

    settings: AgentSettings
    engine: FakeEngine | FakeEmbeddingEngine
    model: LoadedModel
    host: ModelHost
    metrics: AgentMetrics
    serving: OpenAIServing

    def requests(self, endpoint: str, status: int | str) -> float:
        """``edgegen_requests_total`` for one endpoint and status, from the registry."""
        value = self.metrics.registry.get_sample_value(
            "edgegen_requests_total", {"endpoint": endpoint, "status": str(status)})
        return value or 0.0

    def sample(self, name: str, labels: dict[str, str] | None = None) -> float:
        return self.metrics.registry.get_sample_value(name, labels or {}) or 0.0


@contextlib.asynccontextmanager
async def serving_stack(bundle: Bundle, engine: FakeEngine | FakeEmbeddingEngine,
                        **settings: object) -> AsyncIterator[ServingStack]:
    """The agent's serving stack around ``engine`` for the block (inside the event loop that
    runs the test, as the scheduler's task and events belong to it); closed after it.
    ``settings`` override ``AgentSettings`` fields (``max_concurrency``, ``queue_size``...)."""
    cfg = agent_settings(bundle, **settings)
    metrics = AgentMetrics()
    model = fake_model(bundle, engine, cfg)
    host = ModelHost(cfg, model, metrics)
    stack = ServingStack(cfg, engine, model, host, metrics, OpenAIServing(cfg, host, metrics))
    try:
        yield stack
    finally:
        if engine_gate := getattr(engine, "gate", None):
            engine_gate.set()           # let held steps end, so the scheduler can close
        await host.close()
