"""Batched decoding of the genai builder's graph with plain onnxruntime.

onnxruntime-genai 0.15.2 decodes one ``og.Generator`` per sequence and its continuous-batching
``og.Engine`` refuses every request on CPU, so several concurrent sequences would each read all
the weights once per token. Here every decoding sequence advances in ONE session run per step.

How the graph is driven (model.onnx from the genai builder, GroupQueryAttention):

- The graph derives GQA's ``seqlens_k`` as ``sum(attention_mask, axis=1) - 1`` and
  ``total_sequence_length`` as ``attention_mask.shape[1]``; GQA places each row's new key/value
  at that row's own length and rotates by it. So the batch is *right*-padded: row ``b``'s
  mask holds ``length_b + 1`` ones then zeros, and padding after a row's length is never read.
- KV lives in one preallocated buffer per ``past_key_values.<i>.key/value`` of shape
  ``[rows, kv_heads, capacity, head_dim]``; past and present are bound (IO binding) to the same
  memory, which GQA detects and then writes only the new position (no per-step cache copy,
  like onnxruntime-genai's ``past_present_share_buffer``). The buffer grows by whole chunks.
- A new sequence is prefilled alone (batch 1) straight into its row; a finished one is
  removed by moving the last row into its place, so active rows are always ``[0, n)``.

Sampling is ``edge_agent.engine.sampling`` on each row's last logits, as in the onnxruntime engine.
"""

from __future__ import annotations

import numpy as np

from edge_agent.engine.base import SamplingParams, SequenceState, StepResult, step_one
from edge_agent.engine.ort import NUMPY_DTYPES, open_session, run_errors
from edge_agent.engine.sampling import make_rng, sample
from edge_agent.errors import GenerationError, ModelLoadError


_CHUNK = 256          # KV capacity grows in steps of this many positions


class BatchRow:
    """One sequence's place in the batch: its row index, tokens in the cache, sampler."""

    __slots__ = ("index", "length", "rng")

    def __init__(self, rng: np.random.Generator):
        self.index = -1       # -1: not prefilled yet
        self.length = 0
        self.rng = rng


class BatchDecoder:
    """Prefill one sequence at a time; decode all of them in one run per step."""

    def __init__(self, model_path: str, decoder_config: dict, *, providers: list[str],
                 threads: int, context_length: int, vocab_size: int):
        # no spin-waiting: a lone sequence may still be decoding on onnxruntime-genai's own
        # thread pool between our runs, and on a few cores spinning threads starve it
        # (measured: 4 streams fell from ~220 to ~110 tok/s on 2 cores with spinning on)
        self.session = open_session(model_path, providers=providers, threads=threads,
                                    spinning=False)
        names = decoder_config.get("inputs", {})
        outs = decoder_config.get("outputs", {})
        layers = int(decoder_config["num_hidden_layers"])
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
        self.kv_heads = int(decoder_config["num_key_value_heads"])
        self.head_dim = int(decoder_config["head_size"])
        self.context_length = context_length
        logits_out = {o.name: o for o in self.session.get_outputs()}[self.logits]
        self.logits_dtype = NUMPY_DTYPES.get(logits_out.type, np.float32)
        vocab = logits_out.shape[-1]
        self.vocab = vocab if isinstance(vocab, int) else int(vocab_size)
        self._binding = None
        self._generation = 0  # bumped on every reallocation, so a cached binding is stale
        self.rows: list[SequenceState] = []
        self.kv: list[np.ndarray] = []
        self._alloc(rows=4, capacity=_CHUNK)

    # -- the engine's calls -----------------------------------------------------------------

    def start(self, prompt_ids: list[int], params: SamplingParams) -> SequenceState:
        return SequenceState(prompt_ids=list(prompt_ids), params=params,
                             data=BatchRow(make_rng(params)))

    def adopt(self, seq: SequenceState) -> None:
        """Take over a sequence started elsewhere but not stepped yet: prefilled at its next step."""
        if seq.generated:
            raise GenerationError("cannot move a sequence that has begun decoding into the batch")
        seq.data = BatchRow(make_rng(seq.params))

    def step(self, seqs: list[SequenceState]) -> list[StepResult]:
        """The next token of every sequence: decoders in one run, then each newcomer's prefill.

        A failed decode run fails the step; a newcomer's prefill or one row's sampler fails
        only that sequence."""
        decoding = [s for s in seqs if s.data.index >= 0]
        fresh = [s for s in seqs if s.data.index < 0]
        tokens: dict[int, StepResult] = {}
        if decoding:
            with run_errors():
                self._arrange(decoding)
                logits = self._decode(decoding)
            for b, seq in enumerate(decoding):
                tokens[id(seq)] = step_one(seq, lambda s, row=logits[b, -1]: sample(
                    row, s.params, s.data.rng))
        for seq in fresh:
            tokens[id(seq)] = step_one(seq, self._prefill_and_sample)
        return [tokens[id(s)] for s in seqs]

    def _prefill_and_sample(self, seq: SequenceState) -> int:
        with run_errors():
            logits = self._prefill(seq)
        return sample(logits[0, -1], seq.params, seq.data.rng)

    def release(self, seq: SequenceState) -> None:
        row: BatchRow | None = seq.data
        if row is not None and row.index >= 0:
            last = len(self.rows) - 1
            if row.index != last:
                self._move(last, row.index)
            self.rows.pop()
            row.index = -1
            if not self.rows and self.kv[0].shape[2] > _CHUNK:
                self.kv = []  # idle: give back what a long or wide batch grew to
                self._alloc(rows=4, capacity=_CHUNK)
        seq.data = None

    # -- buffers ----------------------------------------------------------------------------

    def _alloc(self, rows: int, capacity: int) -> None:
        """(Re)allocate the KV buffers, keeping what the active rows hold."""
        shape = (rows, self.kv_heads, capacity, self.head_dim)
        fresh = [np.zeros(shape, dtype=self.kv_dtype) for _ in self.kv_pairs]
        if self.kv:
            n, keep = len(self.rows), min(capacity, self.kv[0].shape[2])
            for new, old in zip(fresh, self.kv):
                new[:n, :, :keep] = old[:n, :, :keep]
        self.kv = fresh
        self._generation += 1

    def _ensure(self, rows: int, positions: int) -> None:
        cur_rows, cur_cap = self.kv[0].shape[0], self.kv[0].shape[2]
        if rows <= cur_rows and positions <= cur_cap:
            return
        if positions > self.context_length:
            raise GenerationError(f"sequence of {positions} tokens exceeds the context "
                                  f"length {self.context_length}")
        cap = min(self.context_length, -(-max(positions, cur_cap) // _CHUNK) * _CHUNK)
        self._alloc(cur_rows if rows <= cur_rows else max(rows, 2 * cur_rows), max(cap, positions))

    def _move(self, src: int, dst: int) -> None:
        seq = self.rows[src]
        n = seq.data.length
        for buf in self.kv:
            buf[dst, :, :n] = buf[src, :, :n]
        self.rows[dst] = seq
        seq.data.index = dst

    def _arrange(self, decoding: list[SequenceState]) -> None:
        """Put the sequences to decode in rows [0, len(decoding)), in that order."""
        for b, seq in enumerate(decoding):
            i = seq.data.index
            if i == b:
                continue
            other = self.rows[b]
            # swap rows b and i through a scratch copy of row b
            n = other.data.length
            scratch = [buf[b, :, :n].copy() for buf in self.kv]
            self._move(i, b)
            for buf, saved in zip(self.kv, scratch):
                buf[i, :, :n] = saved
            self.rows[i] = other
            other.data.index = i

    # -- runs -------------------------------------------------------------------------------

    def _run(self, ids: np.ndarray, mask: np.ndarray, first_row: int) -> np.ndarray:
        """One session run for rows [first_row, first_row + batch) with the shared KV buffers."""
        batch, width = ids.shape
        key = (first_row, batch, self._generation)
        if self._binding is None or self._binding[0] != key:
            # the KV views change only when rows join/leave or the buffers grow: rebinding
            # 2 x layers tensors every step would cost more than a small batch's compute
            io = self.session.io_binding()
            for (past, present), buf in zip(self.kv_pairs, self.kv):
                view = buf[first_row:first_row + batch]
                ptr = view.ctypes.data
                io.bind_input(past, "cpu", 0, self.kv_dtype, view.shape, ptr)
                io.bind_output(present, "cpu", 0, self.kv_dtype, view.shape, ptr)
            self._binding = (key, io)
        io = self._binding[1]
        io.bind_cpu_input(self.input_ids, ids)
        io.bind_cpu_input(self.attention_mask, mask)
        logits = np.empty((batch, width, self.vocab), dtype=self.logits_dtype)
        io.bind_output(self.logits, "cpu", 0, self.logits_dtype, logits.shape, logits.ctypes.data)
        self.session.run_with_iobinding(io)
        return logits

    def _decode(self, decoding: list[SequenceState]) -> np.ndarray:
        lengths = np.fromiter((s.data.length for s in decoding), dtype=np.int64)
        total = int(lengths.max()) + 1
        self._ensure(len(self.rows), total)
        ids = np.fromiter((s.generated[-1] for s in decoding), dtype=np.int64)[:, None]
        mask = (np.arange(total)[None, :] <= lengths[:, None]).astype(np.int64)
        logits = self._run(ids, mask, 0)
        for seq in decoding:
            seq.data.length += 1
        return logits

    def _prefill(self, seq: SequenceState) -> np.ndarray:
        tokens = seq.prompt_ids
        n = len(tokens)
        if n == 0:
            raise GenerationError("empty prompt")
        row = len(self.rows)
        self._ensure(row + 1, n)
        seq.data.index = row
        self.rows.append(seq)
        ids = np.asarray([tokens], dtype=np.int64)
        try:
            logits = self._run(ids, np.ones((1, n), dtype=np.int64), row)
        except Exception:
            self.rows.pop()
            seq.data.index = -1
            raise
        seq.data.length = n
        return logits

    def close(self) -> None:
        self.session = None
        self.kv = []
        self.rows = []
