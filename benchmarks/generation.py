"""Generation speed of the edge agent against what a user would otherwise run, in one run.

SmolLM2-135M-Instruct, batch 1, a 28-token prompt, 128 new tokens, greedy (EOS ignored so
every path generates the same count):

- the agent through its own HTTP streaming API (SSE, read with the standard library's
  http.client; int4 also with httpx), for the int4 and fp32 genai bundles and the int8
  optimum bundle; aggregate tok/s at 1, 4 and 8 concurrent streams on int4;
  the agent process's peak RSS (VmHWM);
- PyTorch eager fp32 ``generate``; Optimum ``ORTModelForCausalLM.generate`` on the int8
  bundle; onnxruntime-genai's own loop on the int4 and fp32 bundles.

The int4 batch-1 comparison that matters most (agent vs onnxruntime-genai's own loop) runs
the contenders in alternating rounds, because a shared machine's speed drifts by more than
the difference being measured; it also reports the median of the per-round ratios.

    python benchmarks/generation.py [--store DIR] [--runs 3] [--rounds 8] [--threads N]
                                    [--skip-torch] [--batch1-only]

Bundles are exported into --store on first use (``exporters.export_model``) and reused;
empty --store after upgrading edgegen to time what the new exporter writes.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PROMPT = ("The history of the city begins with a small fishing village on the river. Over "
          "the centuries it grew into a busy port town, and")  # 28 tokens
NEW = 128
# Pause before each timed call: onnxruntime's pool threads spin for a while after a run, and
# the previous contender's would take a core from the next one's first token.
SETTLE_S = 0.3


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def bundle_for(store: Path, precision: str, exporter: str):
    from edge_agent.bundle import iter_bundles

    name = f"smollm2-{precision}"
    for b in iter_bundles(store):
        if b.name == name:
            return b
    from exporters.pipeline import export_model

    print(f"exporting {name} (first run only)...", file=sys.stderr)
    # force: this measures speed; an int8 bundle that misses the quality gate is still timed
    # (the manifest records validation.gate.forced, and the table says so).
    return export_model("builtin:smollm2-135m-instruct", name=name, precision=precision,
                        exporter=exporter, store=store, force=True)


def timed_tokens(step_iter) -> tuple[float, float]:
    """(ttft seconds, decode tok/s) from an iterator yielding once per token."""
    t0 = time.perf_counter()
    stamps = [time.perf_counter() for _ in step_iter]
    return stamps[0] - t0, (len(stamps) - 1) / (stamps[-1] - stamps[0])


def median_runs(fn, runs: int) -> tuple[float, float]:
    fn()  # warm-up
    results = [fn() for _ in range(runs)]
    return statistics.median(r[0] for r in results), statistics.median(r[1] for r in results)


# -- reference paths ----------------------------------------------------------------------

def torch_eager(threads: int, runs: int):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from exporters.sources import resolve_source

    torch.set_num_threads(threads)
    hf = resolve_source("builtin:smollm2-135m-instruct").hf_dir
    tok = AutoTokenizer.from_pretrained(hf)
    model = AutoModelForCausalLM.from_pretrained(hf, torch_dtype=torch.float32).eval()
    ids = tok(PROMPT, return_tensors="pt")
    return median_runs(lambda: _hf_generate(model, ids), runs), ids["input_ids"].shape[1]


def _hf_generate(model, ids):
    import torch
    from transformers.generation.streamers import BaseStreamer

    stamps = []

    class Clock(BaseStreamer):
        def put(self, value):
            stamps.append(time.perf_counter())

        def end(self):
            pass

    t0 = time.perf_counter()
    with torch.no_grad():
        model.generate(**ids, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
                       streamer=Clock())
    stamps = stamps[1:]  # the first put() is the prompt
    return stamps[0] - t0, (len(stamps) - 1) / (stamps[-1] - stamps[0])


def optimum_ort(bundle, threads: int, runs: int):
    import onnxruntime as ort
    from optimum.onnxruntime import ORTModelForCausalLM
    from transformers import AutoTokenizer

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    tok = AutoTokenizer.from_pretrained(bundle.path)
    model = ORTModelForCausalLM.from_pretrained(bundle.path, session_options=so, use_cache=True)
    ids = tok(PROMPT, return_tensors="pt")
    return median_runs(lambda: _hf_generate(model, ids), runs)


def genai_loop(bundle, threads: int):
    """One timed generation per call with onnxruntime-genai's own Generator loop."""
    import onnxruntime_genai as og
    from tokenizers import Tokenizer

    cfg = og.Config(str(bundle.path))
    cfg.clear_providers()
    cfg.overlay(json.dumps({"model": {"decoder": {"session_options": {
        "intra_op_num_threads": threads}}}}))
    model = og.Model(cfg)
    ids = Tokenizer.from_file(str(bundle.file("tokenizer.json"))).encode(PROMPT).ids

    def once():
        p = og.GeneratorParams(model)
        p.set_search_options(do_sample=False, max_length=len(ids) + NEW,
                             min_length=len(ids) + NEW)
        g = og.Generator(model, p)

        def steps():
            g.append_tokens(ids)
            while not g.is_done():
                g.generate_next_token()
                g.get_next_tokens()
                yield

        return timed_tokens(steps())

    return once


# -- the agent ------------------------------------------------------------------------------

class AgentProc:
    def __init__(self, bundle, threads: int, concurrency: int, env: dict | None = None,
                 args: tuple[str, ...] = ()):
        from tests.support.procs import free_port, wait_http

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cli.main", "agent", "--bundle", str(bundle.path), "--node",
             "bench", "--port", str(self.port), "--threads", str(threads),
             "--max-concurrency", str(concurrency), "--queue-size", "16", *args],
            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            env={**os.environ, **(env or {})})
        wait_http(self.url + "/readyz", timeout=300, proc=self.proc)

    def peak_rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def stop(self):
        self.proc.terminate()
        self.proc.wait(60)


class StreamClock:
    """Arrival times of the text-bearing SSE events of one completion stream."""

    def __init__(self):
        self.t0 = time.perf_counter()
        self.first = self.last = None
        self.tokens = 0

    def line(self, line: str | bytes) -> None:
        if not line.startswith(b"data: {" if isinstance(line, bytes) else "data: {"):
            return
        chunk = json.loads(line[6:])
        if chunk["choices"] and chunk["choices"][0]["text"]:
            now = time.perf_counter()
            self.first = self.first or now
            self.last = now
        if chunk.get("usage"):
            self.tokens = chunk["usage"]["completion_tokens"]

    def result(self) -> tuple[float, float, int]:
        """(ttft, decode tok/s, tokens)"""
        return (self.first - self.t0, (self.tokens - 1) / (self.last - self.first),
                self.tokens)


STREAM_BODY = {"prompt": PROMPT, "max_tokens": NEW, "temperature": 0, "ignore_eos": True,
               "stream": True, "stream_options": {"include_usage": True}}


async def stream_once(client: httpx.AsyncClient, url: str) -> tuple[float, float, int]:
    clock = StreamClock()
    async with client.stream("POST", url + "/v1/completions", json=STREAM_BODY) as r:
        async for line in r.aiter_lines():
            clock.line(line)
    return clock.result()


def agent_stream(agent: AgentProc) -> tuple[float, float]:
    """(ttft, decode tok/s) of one streamed request read with httpx."""
    async def one():
        async with httpx.AsyncClient(timeout=300) as c:
            ttft, tps, _ = await stream_once(c, agent.url)
            return ttft, tps
    return asyncio.run(one())


def agent_stream_stdlib(agent: AgentProc) -> tuple[float, float]:
    """The same request read with the standard library's http.client. The client shares the
    machine's cores with the agent, so its CPU slows the agent down: one streamed request of
    128 tokens took 7 ms of client CPU with http.client and 39 ms with httpx here."""
    conn = http.client.HTTPConnection("127.0.0.1", agent.port, timeout=300)
    try:
        clock = StreamClock()
        conn.connect()
        # http.client sends the headers and the body in two writes; with Nagle's algorithm on,
        # the body can wait for the agent's (delayed, up to 40 ms) ACK of the headers
        conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn.request("POST", "/v1/completions", json.dumps(STREAM_BODY),
                     {"content-type": "application/json"})
        response = conn.getresponse()
        if response.status != 200:
            raise RuntimeError(f"agent answered {response.status}: {response.read()[:200]!r}")
        while line := response.readline():
            clock.line(line)
        ttft, tps, _ = clock.result()
        return ttft, tps
    finally:
        conn.close()


def agent_whole(agent: AgentProc) -> float:
    """Seconds for one non-streamed request of NEW tokens (prefill included)."""
    body = {"prompt": PROMPT, "max_tokens": NEW, "temperature": 0, "ignore_eos": True}
    with httpx.Client(timeout=300) as c:
        t0 = time.perf_counter()
        r = c.post(agent.url + "/v1/completions", json=body)
        took = time.perf_counter() - t0
    r.raise_for_status()
    return took


def agent_batch1(agent: AgentProc, runs: int) -> tuple[float, float]:
    return median_runs(lambda: agent_stream_stdlib(agent), runs)


def alternating(contenders: dict, rounds: int) -> dict[str, list[tuple[float, float]]]:
    """Each contender once per round, in turn, after one warm-up each: on a shared machine
    whose speed drifts, neighbours in time are what can fairly be compared."""
    for fn in contenders.values():
        fn()
    results: dict[str, list] = {name: [] for name in contenders}
    for _ in range(rounds):
        for name, fn in contenders.items():
            time.sleep(SETTLE_S)
            results[name].append(fn())
    return results


def agent_aggregate(agent: AgentProc, streams: int, runs: int) -> float:
    """Median aggregate tok/s of ``streams`` requests sent at once, over ``runs`` tries."""
    async def go():
        async with httpx.AsyncClient(timeout=600) as c:
            t0 = time.perf_counter()
            results = await asyncio.gather(*(stream_once(c, agent.url) for _ in range(streams)))
            return sum(r[2] for r in results) / (time.perf_counter() - t0)
    asyncio.run(go())  # warm-up
    return statistics.median(asyncio.run(go()) for _ in range(runs))


def step_times(bundle, threads: int, steps: int = 100) -> None:
    """In-process decode steps of the agent's CPU engine at 1, 2, 4 and 8 rows (40-token
    prompts, median of ``steps`` steps): the ceiling of the agent's aggregate tok/s."""
    import numpy as np

    from edge_agent.engine.base import SamplingParams
    from edge_agent.engine.batch import BatchEngine

    engine = BatchEngine(bundle, threads=threads)
    rng = np.random.default_rng(0)
    params = SamplingParams(max_tokens=steps + 1, temperature=0.0, ignore_eos=True)
    print(f"{cpu_model()}, {len(os.sched_getaffinity(0))} usable cores, {threads} threads")
    one_row = None
    for rows in (1, 2, 4, 8):
        seqs = [engine.start([int(t) for t in rng.integers(100, 40_000, 40)], params)
                for _ in range(rows)]
        for seq in seqs:  # each prompt read alone, then every row decodes in each step
            while (token := engine.step([seq])[0]) is None:
                pass
            seq.generated.append(token)
        took = []
        for _ in range(steps):
            t0 = time.perf_counter()
            for seq, token in zip(seqs, engine.step(seqs)):
                seq.generated.append(token)
            took.append(time.perf_counter() - t0)
        for seq in seqs:
            engine.release(seq)
        step = statistics.median(took)
        one_row = one_row or rows / step
        print(f"  {rows} rows: step {step * 1000:.2f} ms, {rows / step:.0f} tok/s, "
              f"{rows / step / one_row:.2f}x one row")
    engine.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--store", type=Path, default=Path.home() / ".cache" / "edgegen" / "bench")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=8, help="alternating rounds for int4 batch 1")
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--skip-torch", action="store_true")
    ap.add_argument("--batch1-only", action="store_true",
                    help="only the alternating int4 batch-1 comparison, then its ratios")
    ap.add_argument("--step-times", action="store_true",
                    help="only the int4 engine's decode step time at 1, 2, 4 and 8 rows")
    args = ap.parse_args()
    t = args.threads
    b4 = bundle_for(args.store, "int4", "genai")
    if args.step_times:
        step_times(b4, t)
        return
    b32 = bundle_for(args.store, "fp32", "genai")
    b8 = bundle_for(args.store, "int8", "optimum")
    rows: list[tuple[str, float, float, str]] = []

    def add(name, res, rss=""):
        rows.append((name, res[1], res[0] * 1000, rss))
        print(f"  {name}: {res[1]:.1f} tok/s, ttft {res[0] * 1000:.0f} ms {rss}", file=sys.stderr)

    gate8 = (b8.manifest.get("validation") or {}).get("gate") or {}
    int8_label = "int8 optimum" + (" (quality gate forced)" if gate8.get("forced") else "")

    # int4, batch 1: the agent (default, and writing every token at once) against
    # onnxruntime-genai's own loop, alternating round by round.
    og4 = genai_loop(b4, t)
    agent = AgentProc(b4, t, 8)
    every_token = AgentProc(b4, t, 8, args=("--stream-interval-ms", "0"))
    try:
        paired = alternating({"agent": lambda: agent_stream_stdlib(agent),
                              "agent_httpx": lambda: agent_stream(agent),
                              "every_token": lambda: agent_stream_stdlib(every_token),
                              "whole": lambda: agent_whole(agent),
                              "og": og4}, args.rounds)
        aggregate = {} if args.batch1_only else \
            {n: agent_aggregate(agent, n, args.runs) for n in (1, 4, 8)}
        rss4 = f"{agent.peak_rss_mb():.0f} MB"
    finally:
        agent.stop()
        every_token.stop()

    def med(name):
        return (statistics.median(r[0] for r in paired[name]),
                statistics.median(r[1] for r in paired[name]))

    add("edgegen agent, HTTP SSE, int4 genai", med("agent"), rss4)
    add("edgegen agent, HTTP SSE, int4 genai, read with httpx", med("agent_httpx"))
    add("edgegen agent, HTTP SSE, int4 genai, --stream-interval-ms 0", med("every_token"))
    add("onnxruntime-genai own loop, int4 (same rounds)", med("og"))
    ratios = {name: [a[1] / o[1] for a, o in zip(paired[name], paired["og"])]
              for name in ("agent", "agent_httpx", "every_token")}
    # the same 128 tokens without streaming: HTTP request to whole response, against
    # onnxruntime-genai's prefill + decode of the same prompt
    ratios["whole"] = [(o[0] + (NEW - 1) / o[1]) / w
                       for w, o in zip(paired["whole"], paired["og"])]

    if args.batch1_only:
        print_ratios(ratios, args.rounds)
        return

    for label, b in (("fp32 genai", b32), (int8_label, b8)):
        agent = AgentProc(b, t, 8)
        try:
            add(f"edgegen agent, HTTP SSE, {label}", agent_batch1(agent, args.runs),
                f"{agent.peak_rss_mb():.0f} MB")
        finally:
            agent.stop()
    # The alternative for concurrency: the same agent stepping one onnxruntime-genai
    # Generator per stream (batched decoding off).
    sequential = {}
    agent = AgentProc(b4, t, 8, env={"EDGEGEN_GENAI_BATCH": "0"})
    try:
        for n in (1, 4, 8):
            sequential[n] = agent_aggregate(agent, n, args.runs)
    finally:
        agent.stop()
    add("onnxruntime-genai own loop, fp32", median_runs(genai_loop(b32, t), args.runs))
    add(f"Optimum ORTModelForCausalLM, {int8_label}", optimum_ort(b8, t, args.runs))
    if not args.skip_torch:
        res, n_prompt = torch_eager(t, args.runs)
        add("PyTorch eager fp32 generate", res)

    load = os.getloadavg()
    print(f"\nCPU: {cpu_model()}, {os.cpu_count()} cores ({t} threads used); load average "
          f"before/after: {load[0]:.2f}")
    print(f"SmolLM2-135M-Instruct, batch 1, {NEW} new tokens, greedy; int4 rows: median of "
          f"{args.rounds} alternating rounds, others: median of {args.runs}\n")
    print("| path | decode tok/s | time to first token | agent peak RSS |")
    print("| --- | --- | --- | --- |")
    for name, tps, ttft, rss in rows:
        print(f"| {name} | {tps:.1f} | {ttft:.0f} ms | {rss} |")
    print("\n| concurrent streams (agent, int4) | aggregate tok/s, batched decoding (default) "
          "| aggregate tok/s, one genai Generator per stream |")
    print("| --- | --- | --- |")
    for n, v in aggregate.items():
        print(f"| {n} | {v:.1f} | {sequential[n]:.1f} |")
    print_ratios(ratios, args.rounds)


def print_ratios(ratios: dict[str, list[float]], rounds: int) -> None:
    def spread(values: list[float]) -> str:
        if len(values) < 2:
            return f"{statistics.median(values):.3f}"
        q1, q2, q3 = statistics.quantiles(values, n=4)
        return f"{q2:.3f} [{q1:.3f}-{q3:.3f}]"

    print("\nint4, batch 1, agent speed / onnxruntime-genai own loop speed, median "
          f"[quartiles] of the {rounds} per-round ratios: streaming decode tok/s "
          f"{spread(ratios['agent'])}; read with httpx {spread(ratios['agent_httpx'])}; "
          f"--stream-interval-ms 0 {spread(ratios['every_token'])}; whole non-streamed "
          f"request vs prefill + decode {spread(ratios['whole'])}")


if __name__ == "__main__":
    main()
