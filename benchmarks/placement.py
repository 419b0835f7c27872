"""Placement benchmark: cache-aware vs nearest-only routing vs round-robin, one machine.

With a long system prompt shared by every conversation and multi-turn chats that re-send
their history, what time to first token (TTFT) do clients see, and what prefix-cache hit rate
do the agents get, when requests go through

- `edgegen router --placement cache` (load- and cache-aware placement, the default),
- `edgegen router --placement nearest` (nearness and in-flight only, the old behaviour),
- HAProxy round-robin (Debian's, `balance roundrobin`) in front of the same agents?

One run starts the embedded registry, three agents serving the same bundle (`--region
eu-west --threads 1 --max-concurrency 4`; they register themselves), the two routers on that
registry and HAProxy. Workload: `--conversations` chats of `--turns` turns. Every chat opens
with the same ~2,000-character system prompt; each turn adds a short user question (its own
per chat and turn) and the previous turn's actual answer, so turn t re-sends the whole chat.
Requests are streaming chat completions (temperature 0, `--max-tokens`, header
`x-edgegen-region: eu-west`); `--concurrency` chats run at a time, each chat's turns in order.

TTFT runs from sending a request to the first SSE chunk with non-empty `delta.content`. Before
each target's run the agents are left to go idle (their idle re-reads of finished chats
included) and their prefix caches are reset (`POST /edgegen/v1/prefix-cache/reset`, admin
token), so each target starts cold; the prompts are the same for every target. The hit rate
is the agents' `edgegen_prefix_cache_hits_total` / `edgegen_prefix_cache_queries_total` deltas
(prompt tokens) summed over the three. The targets alternate in `--rounds` rounds, the first
one rotating, so drift on a shared machine hits all alike.

    python benchmarks/placement.py [--bundle DIR] [--conversations 6] [--turns 4]
                                   [--concurrency 3] [--max-tokens 16] [--rounds 2]
                                   [--router-arg=--flag --router-arg=value ...]

Without --bundle it serves the newest bundle under ~/.cache/edgegen/bench/smollm2-int4/
(SmolLM2-135M-Instruct int4, as `benchmarks/first_token.py` exports it).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from router import cpu_model, cpu_seconds, cpu_used, haproxy, model_of

from tests.support.procs import EdgegenProcess, free_port, stop_process, wait_http

DEFAULT_STORE = Path.home() / ".cache" / "edgegen" / "bench" / "smollm2-int4"
REGION = "eu-west"
AGENTS = ("agent-a", "agent-b", "agent-c")
TARGETS = ("cache router", "nearest router", "haproxy rr")
CHAT = "/v1/chat/completions"

SYSTEM_PROMPT = """\
You are Harbor, the support assistant of Northwind Outfitters, a company that sells outdoor \
equipment (tents, sleeping bags, backpacks, stoves, water filters and clothing) online and in \
twelve shops. Follow these instructions in every answer.

1. Be brief. Answer in at most three short sentences unless the customer asks for detail. \
Put the answer first; give a reason only when it helps the customer decide.
2. Be accurate. If you do not know something, say so and tell the customer where to find it \
(the product page, the order page, or a human agent). Never invent prices, stock levels, \
delivery dates or order numbers.
3. Orders. Customers can change or cancel an order until it is packed, usually within two \
hours of ordering. After that they can refuse the parcel or return it. Ask for the order \
number before discussing an order, and never ask for a password or a full card number.
4. Returns. Unused items can be returned within 60 days with the receipt; used items within \
30 days if they are faulty. Returns by post are free inside the country. Refunds reach the \
original payment method within five working days of the item arriving at the warehouse.
5. Warranty. Tents, backpacks and stoves have a two-year warranty, sleeping bags and clothing \
one year. Wear, misuse and damage from fire are not covered. Offer a repair before a \
replacement when the item can be repaired in our workshop.
6. Safety. For stoves, fuel, water treatment and anything that can hurt someone, give the \
manufacturer's instruction and tell the customer to read the manual. Do not give medical \
advice; for injuries or illness, tell the customer to contact a doctor or emergency services.
7. Advice. When a customer asks which product to choose, ask about the trip (season, nights, \
group size, weight limit, budget) if they have not said, then suggest at most two products \
and say why. Do not run down other brands.
8. Tone. Be friendly and plain. No jokes about weather or accidents. Use the customer's words \
for things; avoid jargon, or explain it in a few words.
9. Escalation. Hand over to a human agent when the customer is upset after two answers, asks \
for one, reports a safety problem, or needs an exception to these rules.
10. Format. Plain text only: no tables, no markdown headings, no links other than \
northwind.example/help. End with a question only when you need information to continue."""

TOPICS = (
    ("tent", "a two-person tent for a week in the Alps in September"),
    ("sleeping bag", "a sleeping bag for camping near the coast in April"),
    ("stove", "a gas stove that stopped lighting after two trips"),
    ("order", "order 48213 that has not shipped after three days"),
    ("return", "returning hiking boots that were worn once indoors"),
    ("filter", "a water filter for a month of trekking in Nepal"),
    ("backpack", "a 60-litre backpack whose hip belt buckle broke"),
    ("jacket", "a rain jacket that leaks at the seams"),
)
FOLLOW_UPS = (
    "I need help with {what}. What do you suggest?",
    "Thanks. How much does the {topic} weigh, roughly, and is it easy to carry?",
    "What happens if the {topic} turns out to be faulty after a few months?",
    "Can I collect it in a shop instead of waiting for delivery?",
    "Is there anything I should check before my trip?",
    "Could I get a refund instead, and how long would it take?",
    "Please summarise what I should do next.",
    "One more thing: do you ship abroad?",
)


def question(c: int, t: int) -> str:
    topic, what = TOPICS[c % len(TOPICS)]
    text = FOLLOW_UPS[(t - 1 + c // len(TOPICS)) % len(FOLLOW_UPS)]
    return f"Question {c + 1}.{t}: " + text.format(topic=topic, what=what)


@dataclass
class Turn:
    target: str
    round: int
    conversation: int
    turn: int
    ttft_ms: float
    total_ms: float
    node: str
    answer: str


def newest_bundle(store: Path) -> Path:
    bundles = [p for p in store.glob("*/") if (p / "edgegen.json").is_file()]
    if not bundles:
        raise SystemExit(f"no bundle under {store}: pass --bundle DIR, or export one first "
                         f"(`python benchmarks/first_token.py` exports SmolLM2-135M int4 there)")
    return max(bundles, key=lambda p: p.stat().st_mtime)


def started(stack: contextlib.ExitStack, args: list[str], tmp: Path, name: str,
            ready: str, timeout: float = 120) -> EdgegenProcess:
    """`edgegen ARGS` whose stop is on ``stack`` before it is waited for; a process that exits
    or never answers ``ready`` (a path) fails the run with the tail of its log."""
    p = EdgegenProcess(args, tmp, name)
    stack.callback(p.stop)
    try:
        wait_http(ready, timeout=timeout, proc=p.proc)
    except (RuntimeError, TimeoutError) as exc:
        tail = "\n".join(p.log().splitlines()[-15:])
        raise SystemExit(f"`edgegen {' '.join(args)}` did not start: {exc}\n{tail}") from exc
    return p


def metric_sums(url: str) -> dict[str, float]:
    """The agent's counters this benchmark reads, from its /metrics text."""
    out = {"queries": 0.0, "hits": 0.0, "chat": 0.0}
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith("edgegen_prefix_cache_queries_total "):
            out["queries"] = float(line.split()[-1])
        elif line.startswith("edgegen_prefix_cache_hits_total "):
            out["hits"] = float(line.split()[-1])
        elif line.startswith("edgegen_requests_total{") and f'endpoint="{CHAT}"' in line:
            out["chat"] += float(line.split()[-1])
    return out


def wait_idle(pids: list[int], timeout: float = 60.0, cores: float = 0.05) -> float:
    """Wait until the agents together use under ``cores`` over 0.5 s (their idle re-reads of
    finished chats done); returns the seconds waited."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        before = {pid: cpu_seconds(pid) for pid in pids}
        time.sleep(0.5)
        if sum(cpu_used(before[pid], cpu_seconds(pid)) for pid in pids) / 0.5 < cores:
            break
    return time.monotonic() - t0


def reset_caches(urls: list[str], token: str) -> None:
    for url in urls:
        r = httpx.post(url + "/edgegen/v1/prefix-cache/reset", timeout=10,
                       headers={"authorization": f"Bearer {token}"})
        r.raise_for_status()
        if not r.json().get("reset"):
            raise SystemExit(f"{url}: this agent's model has no prefix cache to reset")


async def chat_turn(client: httpx.AsyncClient, url: str, body: dict) -> tuple[float, float,
                                                                              str, str]:
    """One streamed chat completion: (TTFT ms, total ms, answer, x-edgegen-node or '')."""
    t0 = time.perf_counter()
    ttft, parts = None, []
    async with client.stream("POST", url + CHAT, json=body,
                             headers={"x-edgegen-region": REGION}) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{url}: {r.status_code} {(await r.aread())[:300]!r}")
        node = r.headers.get("x-edgegen-node", "")
        async for line in r.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            if "error" in chunk:
                raise RuntimeError(f"{url}: error in the stream: {chunk['error']}")
            for choice in chunk.get("choices", []):
                text = (choice.get("delta") or {}).get("content")
                if text:
                    if ttft is None:
                        ttft = (time.perf_counter() - t0) * 1000
                    parts.append(text)
    total = (time.perf_counter() - t0) * 1000
    if ttft is None:
        raise RuntimeError(f"{url}: a stream with no text")
    return ttft, total, "".join(parts), node


async def run_target(name: str, url: str, model: str, rnd: int, conversations: int,
                     turns: int, concurrency: int, max_tokens: int) -> list[Turn]:
    """Every conversation's turns in order, ``concurrency`` conversations at a time."""
    out: list[Turn] = []
    gate = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        async def conversation(c: int) -> None:
            async with gate:
                messages = [{"role": "system", "content": SYSTEM_PROMPT}]
                for t in range(1, turns + 1):
                    messages.append({"role": "user", "content": question(c, t)})
                    body = {"model": model, "messages": messages, "stream": True,
                            "temperature": 0, "max_tokens": max_tokens}
                    ttft, total, answer, node = await chat_turn(client, url, body)
                    out.append(Turn(name, rnd, c, t, ttft, total, node, answer))
                    messages.append({"role": "assistant", "content": answer})

        await asyncio.gather(*(conversation(c) for c in range(conversations)))
    return out


def pct(xs: list[float], q: int) -> float:
    if not xs:
        return float("nan")
    if len(xs) == 1:
        return xs[0]
    return statistics.quantiles(xs, n=100, method="inclusive")[q - 1]


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b > 0 else "n/a"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", type=Path,
                    help=f"bundle directory (default: the newest under {DEFAULT_STORE})")
    ap.add_argument("--conversations", type=int, default=6, help="chats per target (default 6)")
    ap.add_argument("--turns", type=int, default=4, help="turns per chat (default 4)")
    ap.add_argument("--concurrency", type=int, default=3,
                    help="chats running at a time (default 3)")
    ap.add_argument("--max-tokens", type=int, default=16, help="max_tokens per turn (default 16)")
    ap.add_argument("--rounds", type=int, default=2,
                    help="alternating rounds over the three targets (default 2)")
    ap.add_argument("--router-arg", action="append", default=[], metavar="ARG",
                    help="an extra argument for both `edgegen router`s, repeatable; write flags "
                         "with '=': --router-arg=--placement --router-arg=nearest")
    args = ap.parse_args()
    if min(args.conversations, args.turns, args.concurrency, args.max_tokens, args.rounds) < 1:
        ap.error("--conversations, --turns, --concurrency, --max-tokens and --rounds must be >= 1")
    bundle = args.bundle or newest_bundle(DEFAULT_STORE)
    if not (bundle / "edgegen.json").is_file():
        raise SystemExit(f"{bundle} is not a bundle (no edgegen.json)")

    haproxy_v = subprocess.run(["haproxy", "-v"], capture_output=True, text=True,
                               check=False).stdout.split()
    print(f"CPU: {cpu_model()}, {os.cpu_count()} cores; Python {platform.python_version()}; "
          f"haproxy {haproxy_v[2] if len(haproxy_v) > 2 else '?'}")
    print(f"bundle: {bundle}")
    print(f"3 agents (--region {REGION} --threads 1 --max-concurrency 4); {args.conversations} "
          f"chats x {args.turns} turns per target, {args.concurrency} at a time, max_tokens "
          f"{args.max_tokens}, temperature 0, streamed; system prompt {len(SYSTEM_PROMPT)} "
          f"characters; targets alternating over {args.rounds} round(s)")
    if args.router_arg:
        print(f"extra router arguments: {' '.join(args.router_arg)}")

    token = secrets.token_hex(16)
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="edgegen-placement-")))
        rport = free_port()
        consul = f"http://127.0.0.1:{rport}"
        started(stack, ["registry", "--port", str(rport)], tmp, "registry",
                consul + "/v1/status/leader", timeout=60)

        agent_procs, agent_urls = [], []
        for node in AGENTS:
            port = free_port()
            p = EdgegenProcess(["agent", "--bundle", str(bundle), "--node", node, "--port",
                                str(port), "--region", REGION, "--consul", consul,
                                "--advertise-host", "127.0.0.1", "--threads", "1",
                                "--max-concurrency", "4", "--queue-size", "64",
                                "--admin-token", token], tmp, node)
            stack.callback(p.stop)
            agent_procs.append(p)
            agent_urls.append(f"http://127.0.0.1:{port}")
        for p, url in zip(agent_procs, agent_urls):
            try:
                wait_http(url + "/readyz", timeout=300, proc=p.proc)
            except (RuntimeError, TimeoutError) as exc:
                tail = "\n".join(p.log().splitlines()[-15:])
                raise SystemExit(f"agent {p.name} did not start: {exc}\n{tail}") from exc

        routers: dict[str, str] = {}
        for target, placement in (("cache router", "cache"), ("nearest router", "nearest")):
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            started(stack, ["router", "--consul", consul, "--port", str(port),
                            "--placement", placement, *args.router_arg], tmp,
                    f"router-{placement}", url + "/readyz")
            routers[target] = url
        for url in routers.values():  # both see the three agents before anything is timed
            deadline = time.monotonic() + 60
            while len(httpx.get(url + "/edgegen/v1/endpoints").json()["endpoints"]) < 3:
                if time.monotonic() > deadline:
                    raise SystemExit(f"the router at {url} did not see the three agents")
                time.sleep(0.2)

        hport = free_port()
        hp = haproxy(tmp, hport, [("127.0.0.1", int(u.rsplit(":", 1)[1])) for u in agent_urls],
                     "haproxy")
        stack.callback(stop_process, hp, 10)
        targets = {**routers, "haproxy rr": f"http://127.0.0.1:{hport}"}
        wait_http(targets["haproxy rr"] + "/readyz", timeout=30)

        model = model_of(agent_urls[0])
        warm = {"model": model, "messages": [{"role": "user", "content": "Hello"}],
                "max_tokens": 2, "temperature": 0}
        for url in agent_urls + list(targets.values()):  # first-call paths, connections
            httpx.post(url + CHAT, json=warm, headers={"x-edgegen-region": REGION},
                       timeout=120).raise_for_status()

        pids = [p.pid for p in agent_procs]
        turns: list[Turn] = []
        cache: dict[str, dict[str, float]] = {t: {"queries": 0.0, "hits": 0.0} for t in TARGETS}
        served: dict[str, Counter] = {t: Counter() for t in TARGETS}
        for rnd in range(args.rounds):
            order = TARGETS[rnd % 3:] + TARGETS[:rnd % 3]
            for target in order:
                waited = wait_idle(pids)
                reset_caches(agent_urls, token)
                before = [metric_sums(u) for u in agent_urls]
                t0 = time.monotonic()
                turns += asyncio.run(run_target(target, targets[target], model, rnd,
                                                args.conversations, args.turns,
                                                args.concurrency, args.max_tokens))
                took = time.monotonic() - t0
                after = [metric_sums(u) for u in agent_urls]
                for node, b, a in zip(AGENTS, before, after):
                    cache[target]["queries"] += a["queries"] - b["queries"]
                    cache[target]["hits"] += a["hits"] - b["hits"]
                    served[target][node] += round(a["chat"] - b["chat"])
                print(f"round {rnd + 1}: {target:<15} {took:6.1f} s (waited {waited:.1f} s for "
                      f"the agents to go idle, then reset their prefix caches)")

        print(f"\nTTFT per target (rounds x chats x turns: {args.rounds} x "
              f"{args.conversations} x {args.turns}); hit rate = prefix-cache hit tokens / looked-up prompt "
              f"tokens, all three agents")
        head = (f"{'target':<15} {'requests':>8} {'TTFT p50':>9} {'p90':>8} {'mean':>8} "
                f"{'p50 t>=2':>9} {'total p50':>10} {'hit rate':>9}")
        print(head + "\n" + "-" * len(head))
        stats = {}
        for target in TARGETS:
            mine = [x for x in turns if x.target == target]
            ttft = [x.ttft_ms for x in mine]
            later = [x.ttft_ms for x in mine if x.turn >= 2]
            q = cache[target]["queries"]
            hit = cache[target]["hits"] / q if q else float("nan")
            stats[target] = (pct(ttft, 50), statistics.fmean(ttft))
            print(f"{target:<15} {len(mine):8d} {pct(ttft, 50):9.1f} {pct(ttft, 90):8.1f} "
                  f"{statistics.fmean(ttft):8.1f} {pct(later, 50):9.1f} "
                  f"{pct([x.total_ms for x in mine], 50):10.1f} {hit:9.1%}")
        print("(TTFT and total in ms; p50 t>=2: TTFT p50 of turns 2 and later)")
        for other in ("nearest router", "haproxy rr"):
            (c50, cmean), (o50, omean) = stats["cache router"], stats[other]
            print(f"cache / {other}: TTFT p50 {ratio(c50, o50)}, mean {ratio(cmean, omean)}")

        print("\nrequests per agent (the agents' edgegen_requests_total deltas; the "
              "x-edgegen-node header of each answer, which the agents set and the routers "
              "and HAProxy pass on):")
        for target in TARGETS:
            line = ", ".join(f"{node} {served[target][node]}" for node in AGENTS)
            by_header = Counter(x.node for x in turns if x.target == target and x.node)
            kept = ""
            if by_header:
                chats = {}
                for x in turns:
                    if x.target == target:
                        chats.setdefault((x.round, x.conversation), set()).add(x.node)
                kept = ("; by x-edgegen-node: "
                        + ", ".join(f"{n} {by_header[n]}" for n in sorted(by_header))
                        + f"; chats served by one agent throughout: "
                        f"{sum(len(v) == 1 for v in chats.values())}/{len(chats)}")
            print(f"  {target:<15} {line}{kept}")

        first: dict[tuple[int, int], str] = {}
        same = 0
        for x in turns:
            same += first.setdefault((x.conversation, x.turn), x.answer) == x.answer
        print(f"answers identical to the first run's for the same chat and turn: "
              f"{same}/{len(turns)} (the histories, hence the prompts, differ where not)")
        print(f"\nlogs were in {tmp} (removed)")


if __name__ == "__main__":
    main()
