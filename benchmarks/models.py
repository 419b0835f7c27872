"""The real models, per precision: export time, size, quality and decode speed through the agent.

For each built-in text model and precision it exports a bundle (or reuses one in --store with
the same source, precision and int4 recipe), reads the export's validation figures from the
manifest (teacher-forced top-1 agreement with the PyTorch fp32 reference, perplexity and its
increase, the share of greedy tokens the agent's engine generates as the reference does),
then serves the bundle with ``edgegen agent`` and times streamed greedy completions (a
28-token prompt, 128 new tokens, EOS ignored; median of --runs). With llama-cpp-python
installed (the ``bench`` extra) it also times llama.cpp in-process on the GGUF the model
comes from, in the same run, alternating, and prints the agent's decode rate as a ratio.

    python benchmarks/models.py [--store DIR] [--runs 5] [--threads 2]
                                [--only gemma3-270m:int4 ...]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.generation import (
    NEW,
    PROMPT,
    AgentProc,
    agent_stream_stdlib,
    cpu_model,
)

MODELS = [  # (built-in source, precision)
    ("smollm2-135m-instruct", "int4"),
    ("smollm2-135m-instruct", "fp32"),
    ("gemma3-270m", "int8"),
    ("gemma3-270m", "int4"),
    ("gemma3-270m", "fp32"),
]


def export_or_reuse(store: Path, name: str, precision: str, threads: int):
    """(bundle, seconds the export took in this run or None when reused)."""
    from edge_agent.bundle import iter_bundles
    from exporters.int4_recipe import DEFAULT
    from exporters.pipeline import export_model

    recipe = DEFAULT.name() if precision == "int4" else None
    for bundle in iter_bundles(store):
        m = bundle.manifest
        if (m["source"]["reference"] == f"builtin:{name}" and m["precision"] == precision
                and (m.get("quantization") or {}).get("recipe") == recipe):
            return bundle, None
    started = time.monotonic()
    bundle = export_model(f"builtin:{name}", precision=precision, store=store, threads=threads,
                          force=True)  # the figures are the point, the gate's verdict too
    return bundle, time.monotonic() - started


def llamacpp_decode(name: str, threads: int):
    """A callable timing llama.cpp's decode of NEW tokens on the model's GGUF, or None."""
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    from exporters.sources import builtin_file

    llm = Llama(str(builtin_file(name)), n_ctx=1024, n_threads=threads, verbose=False)
    ids = llm.tokenize(PROMPT.encode(), add_bos=True)

    def once() -> float:
        llm.reset()
        count, first = 0, None
        for _token in llm.generate(ids, temp=0.0, top_k=1, reset=True):
            count += 1
            if first is None:
                first = time.perf_counter()
            if count == NEW:
                break
        return (count - 1) / (time.perf_counter() - first)
    return once


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--store", default=str(REPO / ".cache" / "bench-models"))
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", nargs="*", help="name:precision pairs (default: all)")
    args = ap.parse_args()
    store = Path(args.store)
    store.mkdir(parents=True, exist_ok=True)
    print(f"machine: {cpu_model()}, {platform.machine()}, threads={args.threads}, "
          f"python {platform.python_version()}")
    rows = []
    for name, precision in MODELS:
        if args.only and f"{name}:{precision}" not in args.only:
            continue
        bundle, export_s = export_or_reuse(store, name, precision, args.threads)
        v = bundle.manifest["validation"]
        agent = AgentProc(bundle, args.threads, concurrency=1)
        peer = llamacpp_decode(name, args.threads)
        mine, theirs = [], []
        try:
            agent_stream_stdlib(agent)  # warm-up
            for _ in range(args.runs):
                mine.append(agent_stream_stdlib(agent)[1])
                if peer:
                    theirs.append(peer())
        finally:
            agent.stop()
        size_mb = sum(f["size"] for f in bundle.manifest["files"].values()) / 1e6
        rows.append({
            "model": name, "precision": precision,
            "recipe": (bundle.manifest.get("quantization") or {}).get("recipe", "-"),
            # a reused bundle: the graph build alone, as its manifest recorded it
            "export_s": (f"{export_s:.0f}" if export_s
                         else f"{bundle.manifest.get('export_seconds', '?')} (build)"),
            "size_mb": round(size_mb, 1),
            "agreement": v["teacher_forced_top1_agreement"],
            "perplexity": v["perplexity"], "ref_perplexity": v["reference_perplexity"],
            "ppl_increase_pct": v["ppl_increase_pct"],
            "served_greedy": v.get("served_greedy_agreement"),
            "gate": v["gate"]["passed"],
            "agent_tok_s": statistics.median(mine),
            "llamacpp_tok_s": statistics.median(theirs) if theirs else None,
        })
        print(json.dumps(rows[-1]))
    print()
    print("| model | precision | export s | size MB | top-1 agreement | perplexity (ref) | "
          "served greedy | gate | agent decode tok/s | vs llama.cpp |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ratio = (f"{r['agent_tok_s'] / r['llamacpp_tok_s']:.2f}x" if r["llamacpp_tok_s"]
                 else "-")
        print(f"| {r['model']} | {r['precision']} ({r['recipe']}) | "
              f"{r['export_s']} | {r['size_mb']} | {r['agreement']:.1%} | "
              f"{r['perplexity']:.2f} ({r['ref_perplexity']:.2f}, "
              f"{r['ppl_increase_pct']:+.1f} %) | "
              f"{_pct(r['served_greedy'])} | {'pass' if r['gate'] else 'refused'} | "
              f"{r['agent_tok_s']:.0f} | {ratio} |")


def _pct(value) -> str:
    return "-" if value is None else f"{value:.0%}"


if __name__ == "__main__":
    main()
