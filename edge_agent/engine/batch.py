"""The CPU engine for genai bundles: the builder's graph driven by plain onnxruntime.

One onnxruntime session holds the weights, and every sequence runs on it: a lone one at
batch 1 (as fast as onnxruntime-genai's own loop, measured), several in one run per decode
step. onnxruntime-genai 0.15.2 cannot do this on CPU (its ``og.Engine`` refuses every
request), has no prompt cache, and a second session for it would hold a second copy of the
weights; it is kept for GPU bundles (``genai.GenaiEngine``).

How the graph is driven (model.onnx from the genai builder, GroupQueryAttention):

- The graph derives GQA's ``seqlens_k`` as ``sum(attention_mask, axis=1) - 1`` and
  ``total_sequence_length`` as ``attention_mask.shape[1]``; GQA places each row's new key/value
  at that row's own length and rotates by it. So the batch is *right*-padded: row ``b``'s
  mask holds ``length_b + 1`` ones then zeros, and padding after a row's length is never read.
  The same holds for a run of several new tokens on top of a row's cache, which is how a
  prompt is read in chunks, and after a prefix cache hit.
- KV lives in one buffer ``[2 x layers, rows, kv_heads, capacity, head_dim]``; the graph's
  ``past_key_values.<i>.key/value`` inputs and ``present.*`` outputs are bound (IO binding) to
  views of the same memory, which GQA detects and then writes only the new positions (no
  per-step cache copy). The buffer grows in whole chunks of positions and rows as used; its
  rows are managed by ``kv_rows``.

A step (``step``) decodes every sequence that has its prompt read, in one run, then reads a
chunk of one waiting prompt. While others decode, the chunk is sized so it takes about
``PREFILL_SHARE`` decode steps (measured rates), so running streams keep receiving tokens
while a long prompt is read, as llama.cpp's and vLLM's chunked prefill do; a sequence whose
prompt is not fully read yet gets no token from the step (``None``). A short prompt (a chat
turn's new text after a cache hit, a device's question) is read whole: in pieces it would
wait several steps for its first token, and small runs cost more per token than one run.
Short prompts waiting behind one read in a step are read in it too, up to ``MAX_PREFILL``
tokens (vLLM's budget of tokens per step): requests arriving together then decode together.

Prefix cache. Whole-block prompt prefixes come from and go to the engine's ``PrefixCache``;
only KV computed by prefill runs is cached (``_place`` says why). A reply, computed by decode
runs, is re-read with prefill runs when the agent is idle (``idle_step``) and cached, so the
next turn of a chat, which sends that history back, finds it: exact, off the next request's
critical path, and free while requests are running.
"""

from __future__ import annotations

import json
import logging
import time
from collections import deque

import numpy as np

from edge_agent.bundle import Bundle
from edge_agent.bundle.format import LAST_LOGITS_GRAPH
from edge_agent.engine.base import (
    GenerationEngine,
    SamplingParams,
    SequenceState,
    StepResult,
    eos_token_ids,
    load_tokenizer,
    step_one,
)
from edge_agent.engine.kv_rows import (
    BatchRow,
    arrange_rows,
    common_prefix,
    kv_buffer,
    move_row,
    prefilled,
    short_and_unread,
)
from edge_agent.engine.ort import NUMPY_DTYPES, open_session, run_errors
from edge_agent.engine.prefix_cache import PrefixCache
from edge_agent.engine.sampling import make_rng, pick
from edge_agent.errors import GenerationError, ModelLoadError

log = logging.getLogger(__name__)

_CHUNK = 256            # KV capacity grows in steps of this many positions
MAX_PREFILL = 256       # tokens per prefill run: about the fastest here; bounds the logits
                        # [tokens, vocab] of a bundle without the last-position graph
MIN_PREFILL = 4         # the smallest chunk read while others decode (runs of 1 are decode)
PREFILL_SHARE = 2.0     # a prompt chunk takes about this many decode steps' time
WHOLE_PROMPT = 64       # a prompt with at most this many tokens left is read whole
IDLE_CHUNK = 32         # tokens re-read per idle step: a request arriving waits at most this
REREAD_QUEUE = 8        # finished conversations waiting to be re-read (the newest kept)


def _ema(old: float, new: float) -> float:
    return new if not old else 0.7 * old + 0.3 * new


class BatchEngine(GenerationEngine):
    """Genai bundles on CPU: chunked prefill, prefix cache, batched decode on one session."""

    def __init__(self, bundle: Bundle, *, threads: int, providers: list[str] | None = None,
                 prefix_cache_bytes: int = 0):
        self.bundle = bundle
        self.tokenizer = load_tokenizer(bundle)
        self.eos_token_ids = eos_token_ids(bundle)
        genai = json.loads(bundle.file("genai_config.json").read_text())["model"]
        decoder = genai["decoder"]
        self.context_length = min(bundle.context_length,
                                  int(genai.get("context_length", bundle.context_length)))
        # the decoder with last-position logits where the bundle has it (bundle.format)
        graph = LAST_LOGITS_GRAPH if bundle.has_file(LAST_LOGITS_GRAPH) else decoder["filename"]
        model_path = str(bundle.path / graph)
        self.session = open_session(model_path, providers=providers or ["CPUExecutionProvider"],
                                    threads=threads)
        names, outs = decoder.get("inputs", {}), decoder.get("outputs", {})
        layers = int(decoder["num_hidden_layers"])
        self.input_ids = names.get("input_ids", "input_ids")
        self.attention_mask = names.get("attention_mask", "attention_mask")
        self.logits = outs.get("logits", "logits")
        pk = names.get("past_key_names", "past_key_values.%d.key")
        pv = names.get("past_value_names", "past_key_values.%d.value")
        ok = outs.get("present_key_names", "present.%d.key")
        ov = outs.get("present_value_names", "present.%d.value")
        self.kv_pairs = [(p % i, o % i) for i in range(layers) for p, o in ((pk, ok), (pv, ov))]
        inputs = {i.name: i for i in self.session.get_inputs()}
        missing = {self.input_ids, self.attention_mask, *(p for p, _ in self.kv_pairs)} - set(inputs)
        if missing:
            raise ModelLoadError(f"{model_path} lacks the inputs {sorted(missing)} that "
                                 "genai_config.json names")
        self.kv_dtype = NUMPY_DTYPES.get(inputs[self.kv_pairs[0][0]].type, np.float32)
        self.kv_heads = int(decoder["num_key_value_heads"])
        self.head_dim = int(decoder["head_size"])
        logits_out = {o.name: o for o in self.session.get_outputs()}[self.logits]
        self.logits_dtype = NUMPY_DTYPES.get(logits_out.type, np.float32)
        vocab = logits_out.shape[-1]
        self.vocab = vocab if isinstance(vocab, int) else int(genai.get("vocab_size", 0))
        self.last_only = logits_out.shape[1] == 1  # the last-position graph
        self.prefix_cache = PrefixCache(prefix_cache_bytes)
        self.decode_s = 0.0       # moving averages, to size prompt chunks: a decode step,
        self.chunk_tps = 0.0      # and the prompt tokens/s of chunks read beside decoding
        self._bindings: dict[tuple[int, int], tuple] = {}  # (io binding, logits buffer)
        # (history, salt, cache epoch): conversations to re-read when idle (release)
        self._reread: deque[tuple[list[int], str | None, int]] = deque(maxlen=REREAD_QUEUE)
        self._idle: SequenceState | None = None  # the conversation being re-read
        self.rows: list[SequenceState] = []
        # the prompt tokens whose prefill KV the row past the active ones (the next placed)
        # still holds, as the last sequence there left it: a hit on them needs no copy
        self._spare: list[int] = []
        self.kv = np.zeros((0,), dtype=self.kv_dtype)
        self._alloc(rows=4, capacity=_CHUNK)

    # -- the engine's calls -----------------------------------------------------------------

    def start(self, prompt_ids: list[int], params: SamplingParams, *,
              cache_salt: str | None = None) -> SequenceState:
        if not prompt_ids:
            raise GenerationError("empty prompt")
        return SequenceState(prompt_ids=list(prompt_ids), params=params,
                             data=BatchRow(make_rng(params), cache_salt))

    def step(self, seqs: list[SequenceState]) -> list[StepResult]:
        """Decode every sequence whose prompt is read (one run), then read a chunk of the first
        waiting prompt, and once it is read, the short prompts behind it. A failed decode run
        fails the step; a prompt's failure or one row's sampler fails only that sequence."""
        if self._idle is not None:  # requests first: keep what the re-read has read so far
            self.release(self._idle)
            self._idle = None
        # in row order: the rows then need no rearranging (a finish moves one row, and
        # putting the scheduler's order back swapped rows at every finish: ~3 % at 4 streams)
        decoding = sorted((s for s in seqs if s.generated), key=lambda s: s.data.index)
        waiting = [s for s in seqs if not s.generated]
        tokens: dict[int, StepResult] = {id(s): None for s in waiting}
        if decoding:
            with run_errors():
                arrange_rows(self.kv, self.rows, decoding)
                logits = self._decode(decoding)
            for b, seq in enumerate(decoding):
                tokens[id(seq)] = step_one(seq, lambda s, row=logits[b, -1]: pick(
                    s, row, s.data.rng))
        if waiting:
            budget = self._chunk_budget() if decoding else None
            tokens[id(waiting[0])] = step_one(waiting[0], lambda s: self._read_prompt(
                s, budget, beside_decoding=bool(decoding)))
            room = MAX_PREFILL  # short prompts behind a read one: vLLM's tokens per step
            for seq in waiting[1:] if isinstance(tokens[id(waiting[0])], int) else ():
                tokens[id(seq)] = step_one(seq, lambda s, room=room: self._read_short(
                    s, room, beside_decoding=bool(decoding)))
                if tokens[id(seq)] is None:
                    break
                room -= len(seq.prompt_ids) - seq.cached_tokens
        return [tokens[id(s)] for s in seqs]

    def release(self, seq: SequenceState) -> None:
        row: BatchRow | None = seq.data
        if row is not None and row.index >= 0:
            if not seq.generated:  # cancelled while its prompt was read: keep what was read
                self._cache_row(seq, seq.prompt_ids[:row.length])
            elif self.prefix_cache.enabled:
                history = seq.prompt_ids + seq.generated[:-1]  # the last one was never read
                block = self.prefix_cache.block_tokens
                if len(history) // block > len(seq.prompt_ids) // block:
                    self._reread.append((history, row.salt, row.epoch))
            last = len(self.rows) - 1
            self._spare = prefilled(self.rows[last])
            if row.index != last:
                move_row(self.kv, self.rows, last, row.index)
            self.rows.pop()
            row.index = -1
        seq.data = None  # the KV buffer keeps its pages: freeing them cost a long hit ~30 ms

    def has_idle_work(self) -> bool:
        return self._idle is not None or bool(self._reread)

    def idle_step(self) -> None:
        """Re-read up to IDLE_CHUNK tokens of a finished conversation into the prefix cache."""
        if self._idle is None:
            self.prefix_cache.apply_reset()
            history, salt, epoch = self._reread.pop()  # the newest: the likeliest continued
            if epoch != self.prefix_cache.epoch:
                return  # placed before a reset: it must not fill the cache again
            self._idle = self.start(history, SamplingParams(max_tokens=1, temperature=0.0),
                                    cache_salt=salt)
            self._idle.data.epoch = epoch  # a reset applied while placing it makes it stale
        try:
            done = self._read_prompt(self._idle, IDLE_CHUNK) is not None
        except Exception as exc:  # noqa: BLE001 - a failed re-read costs only a cache entry
            log.warning("prefix cache re-read failed", extra={"error": str(exc)})
            done = True
        if done:
            self.release(self._idle)
            self._idle = None

    def close(self) -> None:
        self._idle = None
        self._reread.clear()
        self.session = None
        self._bindings = {}
        self.kv = np.zeros((0,), dtype=self.kv_dtype)
        self.rows = []
        self._spare = []
        self.prefix_cache.clear()

    # -- prompts ----------------------------------------------------------------------------

    def _chunk_budget(self) -> int:
        """Prompt tokens to read in a step that also decodes: about PREFILL_SHARE decode
        steps' time at the rate measured for such chunks (small runs are slower per token
        than a whole prompt's)."""
        if not self.chunk_tps or not self.decode_s:
            return MIN_PREFILL
        tokens = int(self.chunk_tps * self.decode_s * PREFILL_SHARE)
        return max(MIN_PREFILL, min(MAX_PREFILL, tokens))

    def _read_prompt(self, seq: SequenceState, budget: int | None, *,
                     beside_decoding: bool = False) -> int | None:
        """Read up to ``budget`` more prompt tokens (all of them if None); the first token
        once the whole prompt is read, else None."""
        row: BatchRow = seq.data
        prompt = seq.prompt_ids
        if row.index < 0:
            self._place(seq)
        if beside_decoding and short_and_unread(seq, WHOLE_PROMPT):
            budget = None  # read whole (module docstring)
        while row.length < len(prompt):
            left = len(prompt) - row.length
            n = min(left, MAX_PREFILL if budget is None else budget)
            if left - n == 1:
                n -= 1  # never leave one token: a 1-token run is the decode kernel (see _place)
            started = time.perf_counter()
            with run_errors():
                logits = self._prefill(seq, prompt[row.length:row.length + n])
            if beside_decoding:
                self.chunk_tps = _ema(self.chunk_tps, n / (time.perf_counter() - started))
            # cached as it is read: others with this head need not wait for its end, and a
            # long prompt's copy is spread over its chunks instead of stalling one step
            self._cache_row(seq, prompt[:row.length])
            if budget is not None:
                break
        if row.length < len(prompt):
            return None
        return pick(seq, logits[0, -1], row.rng)

    def _read_short(self, seq: SequenceState, room: int, *,
                    beside_decoding: bool) -> int | None:
        """Read ``seq``'s prompt whole if, after its cache hit, at most WHOLE_PROMPT tokens
        (and ``room``) are left: its first token; else None, placed for a later step."""
        if seq.data.index < 0:
            self._place(seq)
        if not short_and_unread(seq, min(WHOLE_PROMPT, room)):
            return None
        return self._read_prompt(seq, None, beside_decoding=beside_decoding)

    def _place(self, seq: SequenceState) -> None:
        """Give ``seq`` the next free row, filled with its prompt's cached prefix.

        Exactness: onnxruntime's attention computes a position's keys and values slightly
        differently in a 1-token run (decode) than in a run of several (prefill); between
        prefill runs of any widths >= 2 they are bit-identical (measured). So the cache holds
        only positions read by prefill, and at least the prompt's last two tokens are read
        again: a hit then gives the same logits, and the same greedy tokens, as no cache."""
        row: BatchRow = seq.data
        blocks = self.prefix_cache.lookup(seq.prompt_ids[:-2], row.salt)
        block = self.prefix_cache.block_tokens
        cached = len(blocks) * block
        index = len(self.rows)
        self._ensure(index + 1, len(seq.prompt_ids))  # a grown buffer has no spare (_alloc)
        # blocks the row already holds, as the last sequence there read them, are not copied
        # again (a chat's next turn on an idle agent: ~7 ms for a 1.2k-token head). They
        # are equal to the cached ones: same tokens from the start, both read by prefill.
        in_place = common_prefix(self._spare, seq.prompt_ids) // block
        self._spare = []
        for i in range(in_place, len(blocks)):
            self.kv[:, index, :, i * block:(i + 1) * block] = blocks[i]
        row.index, row.length = index, cached
        row.epoch = self.prefix_cache.epoch if row.epoch is None else row.epoch
        seq.cached_tokens = cached
        self.rows.append(seq)

    def _cache_row(self, seq: SequenceState, tokens: list[int]) -> None:
        """Cache the row's whole blocks, unless the cache was reset since the row was placed
        (a reset leaves no entry of a request admitted before it)."""
        row: BatchRow = seq.data
        self.prefix_cache.apply_reset()
        if row.epoch == self.prefix_cache.epoch:
            self.prefix_cache.store(tokens, row.salt,
                                    lambda a, b, i=row.index: self.kv[:, i, :, a:b].copy())

    # -- buffers ----------------------------------------------------------------------------

    def _alloc(self, rows: int, capacity: int) -> None:
        """(Re)allocate the KV buffer, keeping what the active rows hold."""
        fresh = kv_buffer((len(self.kv_pairs), rows, self.kv_heads, capacity, self.head_dim),
                          self.kv_dtype)
        if self.kv.ndim == 5:
            n, keep = len(self.rows), min(capacity, self.kv.shape[3])
            fresh[:, :n, :, :keep] = self.kv[:, :n, :, :keep]
        self.kv = fresh
        self._bindings = {}
        self._spare = []  # only the active rows were kept

    def _ensure(self, rows: int, positions: int) -> None:
        cur_rows, cur_cap = self.kv.shape[1], self.kv.shape[3]
        if rows <= cur_rows and positions <= cur_cap:
            return
        if positions > self.context_length:
            raise GenerationError(f"sequence of {positions} tokens exceeds the context "
                                  f"length {self.context_length}")
        cap = min(self.context_length, -(-max(positions, cur_cap) // _CHUNK) * _CHUNK)
        self._alloc(cur_rows if rows <= cur_rows else max(rows, 2 * cur_rows), max(cap, positions))

    # -- runs -------------------------------------------------------------------------------

    def _run(self, ids: np.ndarray, mask: np.ndarray, first_row: int) -> np.ndarray:
        """One session run for rows [first_row, first_row + batch) with the shared KV buffer.

        With the last-position graph the logits buffer is bound once per binding and reused:
        the result is valid until the next run with the same rows (callers sample at once)."""
        batch, width = ids.shape
        bound = self._bindings.get((first_row, batch))
        if bound is None:
            # the KV views change only when rows join/leave or the buffer grows: rebinding
            # 2 x layers tensors every step would cost more than a small batch's compute
            io = self.session.io_binding()
            for (past, present), buf in zip(self.kv_pairs, self.kv):
                view = buf[first_row:first_row + batch]
                ptr = view.ctypes.data
                io.bind_input(past, "cpu", 0, self.kv_dtype, view.shape, ptr)
                io.bind_output(present, "cpu", 0, self.kv_dtype, view.shape, ptr)
            logits = None
            if self.last_only:
                logits = np.empty((batch, 1, self.vocab), dtype=self.logits_dtype)
                self._bind_logits(io, logits)
            bound = self._bindings[(first_row, batch)] = (io, logits)
        io, logits = bound
        io.bind_cpu_input(self.input_ids, ids)
        io.bind_cpu_input(self.attention_mask, mask)
        if logits is None:  # a bundle without the last-position graph: [batch, width, vocab]
            logits = np.empty((batch, width, self.vocab), dtype=self.logits_dtype)
            self._bind_logits(io, logits)
        self.session.run_with_iobinding(io)
        return logits

    def _bind_logits(self, io, logits: np.ndarray) -> None:
        io.bind_output(self.logits, "cpu", 0, self.logits_dtype, logits.shape, logits.ctypes.data)

    def _decode(self, decoding: list[SequenceState]) -> np.ndarray:
        started = time.perf_counter()
        lengths = np.fromiter((s.data.length for s in decoding), dtype=np.int64)
        total = int(lengths.max()) + 1
        self._ensure(len(self.rows), total)
        ids = np.fromiter((s.generated[-1] for s in decoding), dtype=np.int64)[:, None]
        mask = (np.arange(total)[None, :] <= lengths[:, None]).astype(np.int64)
        logits = self._run(ids, mask, 0)
        for seq in decoding:
            seq.data.length += 1
        self.decode_s = _ema(self.decode_s, time.perf_counter() - started)
        return logits

    def _prefill(self, seq: SequenceState, tokens: list[int]) -> np.ndarray:
        """Read ``tokens`` into ``seq``'s row on top of what it holds."""
        row: BatchRow = seq.data
        total = row.length + len(tokens)
        self._ensure(len(self.rows), total)
        ids = np.asarray([tokens], dtype=np.int64)
        logits = self._run(ids, np.ones((1, total), dtype=np.int64), row.index)
        row.length = total
        return logits
