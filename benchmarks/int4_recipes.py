"""int4 recipes compared on one model: quality, decode speed through the agent's engine, size.

Each recipe (``exporters.int4_recipe``) is exported from the same source into a store with
``export_model(force=True)`` (a recipe the quality gate refuses is still measured; a recipe
whose export fails is listed with its error), and reported with:

- from the manifest's validation figures (``exporters.validation``): teacher-forced top-1
  agreement on the 64 continuation positions, perplexity on the built-in eval text and its
  increase over the PyTorch fp32 reference;
- over every next-token position of that eval text (301 for SmolLM2, a finer measure than
  64): top-1 agreement with the reference and the mean KL divergence of the next-token
  distributions;
- decode tok/s through the agent's own engine (``edge_agent.engine.loader.load_engine``,
  loaded as ``edgegen agent`` loads it; batch 1, greedy, EOS ignored), as a ratio to the
  baseline (``rtn-bs32``, the builder's plain round-to-nearest): every round runs the
  baseline between each two other recipes, each recipe is divided by the mean of the
  baseline runs just before and after it, and the table gives the median [quartiles] over
  the rounds;
- bundle size on disk, and export time (the builder's step / the whole export with its
  validation).

    python benchmarks/int4_recipes.py [--source builtin:smollm2-135m-instruct]
        [--recipes rtn-bs32,k_quant-bs32,...] [--recipe key=value,...] [--rounds 8]
        [--new-tokens 128] [--threads N] [--store DIR] [--json OUT]

Without ``--store`` the bundles go to a temporary directory removed at the end; with it, a
bundle an earlier run exported there is reused (its export time shows as "reused").
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.generation import PROMPT, SETTLE_S, cpu_model

BASELINE = "rtn-bs32"
RECIPES = ("rtn-bs32", "rtn-bs64", "rtn-bs128", "rtn_inc-bs32", "k_quant-bs32", "k_quant-bs64",
           "k_quant-bs128", "rtn-bs32-lmhead8", "rtn-bs64-lmhead8", "k_quant-bs32-lmhead8",
           "k_quant-bs32-mixed", "rtn-bs32-lmhead32", "rtn-bs32-acc1")


def with_hugepages() -> None:
    """Re-execute once with glibc's hugetlb tunable, as the agent does (edge_agent.hugepages),
    so that the engines' weights sit in the pages the agent's would."""
    from edge_agent import hugepages

    if hugepages.wanted():
        tunables = ":".join(filter(None, [os.environ.get("GLIBC_TUNABLES"), hugepages.TUNABLE]))
        os.execve(sys.executable, [sys.executable, *sys.argv],
                  {**os.environ, "GLIBC_TUNABLES": tunables})


def export_all(source: str, recipes: list[str], store: Path, threads: int, exporter: str | None,
               progress) -> tuple[dict[str, dict], dict[str, str]]:
    """(figures per exported recipe, the error of each recipe whose export failed)"""
    from edge_agent.bundle import iter_bundles
    from exporters.errors import ExportError
    from exporters.pipeline import export_model
    from exporters.quiet import quiet_libraries

    slug = source.rsplit(":", 1)[-1].rsplit("/", 1)[-1].removesuffix(".gguf").lower()
    kept = {b.name: b for b in iter_bundles(store)}
    task = progress.add_task("exporting", total=len(recipes))
    out, failed = {}, {}
    for recipe in recipes:
        progress.update(task, description=f"exporting {recipe}")
        name = f"{slug}-{_file_safe(recipe)}"
        started = time.monotonic()
        bundle = kept.get(name)  # --store: a bundle an earlier run exported is reused
        if bundle is None:
            try:
                with quiet_libraries():
                    bundle = export_model(source, name=name, precision="int4",
                                          exporter=exporter, store=store, threads=threads,
                                          force=True, int4_recipe=recipe)
            except ExportError as exc:
                failed[recipe] = str(exc)
                progress.console.print(f"{recipe}: export failed: {exc}")
                progress.advance(task)
                continue
        m = bundle.manifest
        out[recipe] = {
            "bundle": bundle, "validation": m["validation"], "quantization": m["quantization"],
            "size_mb": sum(f["size"] for f in m["files"].values()) / 1e6,
            "build_s": m["export_seconds"],
            "export_s": None if name in kept else time.monotonic() - started,
        }
        progress.advance(task)
    return out, failed


def _file_safe(recipe: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in recipe)


def decode_once(engine, prompt_ids: list[int], new: int) -> float:
    """Decode tok/s after the first token of one greedy generation."""
    from edge_agent.engine.base import SamplingParams

    seq = engine.start(prompt_ids, SamplingParams(max_tokens=new, temperature=0.0,
                                                  ignore_eos=True))
    stamps = []
    try:
        for _ in range(new):
            (token,) = engine.step([seq])
            if isinstance(token, Exception):
                print(f"  generation stopped after {len(stamps)} tokens: {token}",
                      file=sys.stderr)
                break
            seq.generated.append(token)
            stamps.append(time.perf_counter())
    finally:
        engine.release(seq)
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


def decode_rounds(results: dict[str, dict], threads: int, rounds: int, new: int,
                  progress) -> None:
    """Per round, the baseline runs between every two other recipes (base, a, base, b, base,
    ...; the others' order reversed every other round), and each recipe's speed is divided by
    the mean of the baseline runs just before and after it: on a machine whose speed drifts
    within seconds, only neighbours in time compare fairly. Adds "tps" and "ratios"."""
    from edge_agent.engine.loader import load_engine
    from edge_agent.settings import AgentSettings

    names = list(results)
    base = BASELINE if BASELINE in results else names[0]
    others = [n for n in names if n != base]
    engines = {}
    for name in names:
        bundle = results[name]["bundle"]
        engines[name] = load_engine(bundle, AgentSettings(bundle=str(bundle.path), node="bench",
                                                          threads=threads))
    prompt = engines[base].tokenizer.encode(PROMPT).ids
    for name in names:  # warm-up
        decode_once(engines[name], prompt, new)
        results[name].update(tps=[], ratios=[])

    def timed(name: str) -> float:
        time.sleep(SETTLE_S)
        tps = decode_once(engines[name], prompt, new)
        results[name]["tps"].append(tps)
        progress.advance(task)
        return tps

    task = progress.add_task("decoding", total=rounds * (2 * len(others) + 1))
    for r in range(rounds):
        progress.update(task, description=f"decoding, round {r + 1}/{rounds}")
        before = timed(base)
        for name in others if r % 2 == 0 else others[::-1]:
            tps = timed(name)
            after = timed(base)
            results[name]["ratios"].append(tps / ((before + after) / 2))
            before = after
    results[base]["ratios"] = [1.0] * rounds
    for engine in engines.values():
        engine.close()


def eval_text_figures(results: dict[str, dict], source: str, threads: int) -> None:
    """Over every position of the validation's eval text (not only the 64 continuation
    positions the manifest's agreement counts): top-1 agreement with the fp32 reference and
    the mean KL divergence of the bundle's next-token distribution from the reference's."""
    import numpy as np

    from exporters.onnx_graph import Graph
    from exporters.quiet import quiet_libraries
    from exporters.reference import load_reference
    from exporters.sources import resolve_source
    from exporters.validation import MAX_EVAL_TOKENS, eval_text

    with quiet_libraries():
        ref = load_reference(resolve_source(source).hf_dir, "text-generation")
        ids = ref.encode(eval_text())[:MAX_EVAL_TOKENS]
        want = _log_softmax(ref.logits(ids)[:-1])
    for res in results.values():
        sig = res["bundle"].manifest["signature"]
        graph = Graph(res["bundle"].path / "model.onnx", threads=threads)
        got = _log_softmax(graph.run(ids, output="logits", kv_heads=sig["num_kv_heads"],
                                     head_dim=sig["head_dim"])[:-1])
        del graph
        res["eval_top1"] = float((got.argmax(-1) == want.argmax(-1)).mean())
        res["eval_kl"] = float((np.exp(want) * (want - got)).sum(-1).mean())
        res["eval_positions"] = len(want)


def _log_softmax(logits):
    import numpy as np

    x = logits.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def spread(values: list[float]) -> str:
    if len(values) < 3:
        return f"{statistics.median(values):.3f}"
    q1, q2, q3 = statistics.quantiles(values, n=4)
    return f"{q2:.3f} [{q1:.3f}-{q3:.3f}]"


def rows(results: dict[str, dict]) -> list[list[str]]:
    out = []
    for name, res in results.items():
        v = res["validation"]
        gate = v.get("gate") or {}
        out.append([
            name, f"{v['teacher_forced_top1_agreement']:.1%}", f"{v['perplexity']:.3f}",
            f"{v['ppl_increase_pct']:+.2f} %" + (" (gate: refused)" if gate.get("forced") else ""),
            f"{res['eval_top1']:.1%}", f"{res['eval_kl']:.4f}",
            spread(res["ratios"]),
            f"{res['size_mb']:.1f}",
            f"{res['build_s']:.0f} / "
            + (f"{res['export_s']:.0f}" if res["export_s"] is not None else "(reused)"),
        ])
    return out


HEADER = ["recipe", "top-1 agreement", "perplexity", "vs fp32", "eval-text top-1",
          "eval-text KL", f"decode speed / {BASELINE}",
          "bundle MB", "export s (build / all)"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--source", default="builtin:smollm2-135m-instruct")
    ap.add_argument("--recipes", default=",".join(RECIPES),
                    help="comma-separated recipe names; a key=value recipe goes in its own "
                         "--recipe")
    ap.add_argument("--recipe", action="append", default=[],
                    help="one more recipe as key=value,... (exporters.int4_recipe)")
    ap.add_argument("--exporter", choices=("genai", "optimum"), default=None)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--store", type=Path, default=None, help="keep the bundles here")
    ap.add_argument("--json", type=Path, default=None, help="write the raw figures here")
    args = ap.parse_args()
    with_hugepages()
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from exporters.int4_recipe import resolve

    recipes = [r for r in args.recipes.split(",") if r] + args.recipe
    for r in recipes:
        resolve(r)  # an unknown name fails now, not after an hour of exports
    logging.getLogger("onnxruntime").setLevel(logging.WARNING)
    console = Console(stderr=True, width=None if sys.stderr.isatty() else 200)
    store = args.store or Path(tempfile.mkdtemp(prefix="int4-recipes-"))
    started = time.monotonic()
    load_before = os.getloadavg()[0]
    try:
        with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn(
                "{task.completed}/{task.total}"), TimeElapsedColumn(), console=console) as prog:
            results, failed = export_all(args.source, recipes, store, args.threads,
                                         args.exporter, prog)
            export_s = time.monotonic() - started
            eval_text_figures(results, args.source, args.threads)
            decode_rounds(results, args.threads, args.rounds, args.new_tokens, prog)
    finally:
        if args.store is None:
            shutil.rmtree(store, ignore_errors=True)
    total_s = time.monotonic() - started
    v0 = next(iter(results.values()))["validation"]
    print(f"CPU: {cpu_model()}, {os.cpu_count()} cores ({args.threads} threads used); load "
          f"average before/after: {load_before:.2f}/{os.getloadavg()[0]:.2f}")
    print(f"{args.source}, int4, fp32 reference perplexity {v0['reference_perplexity']:.3f} "
          f"({v0['eval_tokens']} tokens); decode: batch 1, greedy, {args.new_tokens} new "
          f"tokens, agent engine, {args.rounds} alternating rounds; exports {export_s:.0f} s, "
          f"whole run {total_s:.0f} s\n")
    table = Table(*HEADER, title="int4 recipes")
    print("| " + " | ".join(HEADER) + " |")
    print("|" + " --- |" * len(HEADER))
    for row in rows(results):
        table.add_row(*row)
        print("| " + " | ".join(row) + " |")
    for name, error in failed.items():
        print(f"\n{name}: not measured, the export failed: {error}")
    console.print(table)
    if args.json:
        args.json.write_text(json.dumps({"failed": failed, "results": {
            name: {k: v for k, v in res.items() if k != "bundle"}
            for name, res in results.items()}}, indent=1))


if __name__ == "__main__":
    main()
