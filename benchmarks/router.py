"""Router benchmark, run in one go on one machine (prints the CPU model and core count).

1. Added latency: the same short chat requests, at a fixed rate (open loop), sent to an agent
   directly, through `edgegen router`, and through HAProxy (Debian's, the reference proxy a
   user would put in front instead); p50/p99 of each and of the difference to direct. The
   three targets alternate in rounds so that drift on a shared machine hits all alike.
2. Distance: three agents behind WAN proxies 5/40/120 ms away (one-way delay per direction);
   end-to-end p50 through the router choosing the nearest (region hint, and no hint at all so
   it learns from its latency EWMA) versus HAProxy round-robin across the three.
3. Overhead: the router's own cost, with no model behind it. A stand-in upstream (a HAProxy
   frontend that answers every request itself with a small chat.completion JSON, so the
   upstream is never the limit) is registered as an edge; wrk (-t1, 16 connections, POST of a
   short chat request) loads it directly, through HAProxy and through `edgegen router` in
   alternating rounds: req/s, p50/p99, non-2xx answers and socket errors (a proxy that answers
   errors fast must not look good), and the proxy's CPU ms per 1,000 requests (from
   /proc/<pid>/stat, the router's worker children included). Then a trickle: one keep-alive
   client at a fixed low rate (open loop) against the same three, p50/p99 added over direct.
   Prints the bars (router against HAProxy, as ratios) met or missed; never fails on them.
   Two reference points run under the load too (`python_floor.py`): a bare callback-only
   Python proxy, the cheapest data path Python has here, and the same making the router's own
   per-request decisions, which is what that logic costs with no data path overhead.

    python benchmarks/router.py [--part all|latency|distance|overhead] [--bundle DIR]
                                [--rate 5] [--requests 150] [--rounds 3]
                                [--duration 10] [--connections 16]
                                [--trickle-rate 40] [--trickle-requests 400]
                                [--router-arg=--flag --router-arg=value ...]

Without --bundle a tiny random llama (SmolLM2's tokenizer) is exported first, as the tests do;
`--part overhead` needs no model. The overhead part needs `wrk` (scripts/install.sh adds it).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.support.procs import (  # noqa: E402
    EdgegenProcess,
    free_port,
    stop_process,
    wait_http,
    wait_port,
)
from tests.support.wan_proxy import WanProxy  # noqa: E402


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def tiny_bundle(store: Path) -> Path:
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    from exporters.pipeline import export_model
    from exporters.sources import resolve_source

    src = resolve_source("builtin:smollm2-135m-instruct").hf_dir
    out = store / "tiny-llama"
    config = LlamaConfig(vocab_size=49152, hidden_size=128, intermediate_size=256,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=1024, tie_word_embeddings=True,
                         bos_token_id=1, eos_token_id=2, pad_token_id=2, initializer_range=0.1)
    torch.manual_seed(0)
    LlamaForCausalLM(config).eval().save_pretrained(out)
    GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=2).save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                 "chat_template.jinja"):
        if (src / name).is_file():
            shutil.copy2(src / name, out / name)
    return export_model(str(out), name="tiny-llama-genai", precision="fp32", exporter="genai",
                        store=store / "bundles", threads=2).path


def haproxy(tmp: Path, port: int, servers: list[tuple[str, int]], name: str) -> subprocess.Popen:
    lines = "\n".join(f"  server s{i} {h}:{p} check inter 2s" for i, (h, p) in
                      enumerate(servers))
    cfg = tmp / f"{name}.cfg"
    cfg.write_text(f"""global
  maxconn 2048
defaults
  mode http
  timeout connect 2s
  timeout client 120s
  timeout server 120s
  option http-keep-alive
  http-reuse always
  retries 2
  option redispatch
  retry-on conn-failure empty-response 503
frontend fe
  bind 127.0.0.1:{port}
  default_backend be
backend be
  balance roundrobin
{lines}
""")
    subprocess.run(["haproxy", "-c", "-q", "-f", str(cfg)], check=True)
    proc = subprocess.Popen(["haproxy", "-db", "-f", str(cfg)], stdout=subprocess.DEVNULL,
                            stderr=open(tmp / f"{name}.log", "wb"))
    return proc


async def run_rate(url: str, model: str, rate: float, n: int, headers: dict | None = None
                   ) -> list[float]:
    """Open loop: request i starts at i/rate seconds whatever the others do; latencies in ms."""
    body = {"model": model, "messages": [{"role": "user", "content": "Hello"}],
            "max_tokens": 2, "temperature": 0}
    out: list[float] = []
    limits = httpx.Limits(max_connections=256, max_keepalive_connections=256)
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:
        async def one(delay: float) -> None:
            await asyncio.sleep(delay)
            t = time.perf_counter()
            r = await client.post(url + "/v1/chat/completions", json=body, headers=headers)
            if r.status_code != 200:
                raise RuntimeError(f"{url}: {r.status_code} {r.headers} {r.text[:300]}")
            out.append((time.perf_counter() - t) * 1000)

        await one(0)  # warm the connection
        out.clear()
        await asyncio.gather(*(one(i / rate) for i in range(n)))
    return out


def pct(xs: list[float], q: float) -> float:
    return statistics.quantiles(xs, n=100, method="inclusive")[q - 1] if q < 100 else max(xs)


def model_of(url: str) -> str:
    return httpx.get(url + "/v1/models").json()["data"][0]["id"]


def agent(bundle, node, port, consul, tmp, region="", advertise="127.0.0.1"):
    return EdgegenProcess(["agent", "--bundle", str(bundle), "--node", node, "--port",
                           str(port), "--region", region, "--consul", consul,
                           "--advertise-host", advertise, "--threads", "1",
                           "--max-concurrency", "4", "--queue-size", "64"], tmp, node)


def registry(tmp, name):
    port = free_port()
    p = EdgegenProcess(["registry", "--port", str(port)], tmp, name)
    wait_http(f"http://127.0.0.1:{port}/v1/status/leader", proc=p.proc)
    return p, f"http://127.0.0.1:{port}"


def router(consul, tmp, name, extra: list[str] | tuple[str, ...] = ()):
    port = free_port()
    p = EdgegenProcess(["router", "--consul", consul, "--port", str(port), *extra], tmp, name)
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/readyz", timeout=120, proc=p.proc)
    return p, url


def added_latency(bundle: Path, tmp: Path, rate: float, n: int, rounds: int = 3,
                  router_args: list[str] | tuple[str, ...] = ()) -> None:
    reg, consul = registry(tmp, "registry-a")
    port = free_port()
    a = agent(bundle, "bench-a", port, consul, tmp)
    direct = f"http://127.0.0.1:{port}"
    wait_http(direct + "/readyz", timeout=120, proc=a.proc)
    r, router_url = router(consul, tmp, "router-a", router_args)
    hport = free_port()
    hp = haproxy(tmp, hport, [("127.0.0.1", port)], "haproxy-a")
    ha_url = f"http://127.0.0.1:{hport}"
    wait_http(ha_url + "/readyz", timeout=30)
    try:
        model = model_of(direct)
        lat: dict[str, list[float]] = {"direct": [], "router": [], "haproxy": []}
        for _ in range(rounds):
            for name, url in (("direct", direct), ("router", router_url), ("haproxy", ha_url)):
                lat[name] += asyncio.run(run_rate(url, model, rate, n // rounds))
        print(f"\n1. Added latency: {n // rounds * rounds} chat requests per target at "
              f"{rate:g} req/s (max_tokens=2), {rounds} alternating rounds")
        print(f"{'target':<10} {'p50 ms':>8} {'p99 ms':>8} {'+p50 ms':>8} {'+p99 ms':>8}")
        d50, d99 = pct(lat["direct"], 50), pct(lat["direct"], 99)
        for name, xs in lat.items():
            p50, p99 = pct(xs, 50), pct(xs, 99)
            print(f"{name:<10} {p50:8.2f} {p99:8.2f} {p50 - d50:+8.2f} {p99 - d99:+8.2f}")
    finally:
        hp.terminate()
        hp.wait(10)
        for p in (r, a, reg):
            p.stop()


def distance(bundle: Path, tmp: Path, rate: float, n: int,
             router_args: list[str] | tuple[str, ...] = ()) -> None:
    reg, consul = registry(tmp, "registry-b")
    edges = [("edge-5ms", "eu-west", 5, "127.0.0.2"), ("edge-40ms", "eu-central", 40,
                                                        "127.0.0.3"),
             ("edge-120ms", "us-east", 120, "127.0.0.4")]
    procs, proxies, servers = [], [], []
    for node, region, delay, addr in edges:
        port = free_port()
        proxies.append(WanProxy((addr, port), ("127.0.0.1", port), delay).start())
        procs.append(agent(bundle, node, port, consul, tmp, region=region, advertise=addr))
        servers.append((addr, port))
    for (addr, port), p in zip(servers, procs):
        wait_http(f"http://127.0.0.1:{port}/readyz", timeout=120, proc=p.proc)
    r, router_url = router(consul, tmp, "router-b", router_args)
    deadline = time.monotonic() + 60
    while len(httpx.get(router_url + "/edgegen/v1/endpoints").json()["endpoints"]) < 3:
        if time.monotonic() > deadline:
            raise TimeoutError("the router did not see the three edges")
        time.sleep(0.2)
    hport = free_port()
    hp = haproxy(tmp, hport, servers, "haproxy-b")
    ha_url = f"http://127.0.0.1:{hport}"
    wait_http(ha_url + "/readyz", timeout=30)
    try:
        model = model_of(router_url)
        runs = {
            "router, region hint (nearest)": (router_url, {"x-edgegen-region": "eu-west"}),
            "router, no hint (EWMA)": (router_url, None),
            "haproxy round-robin": (ha_url, None),
        }
        print(f"\n2. Distance: edges 5/40/120 ms away (one-way), {n} requests each at "
              f"{rate:g} req/s")
        print(f"{'routing':<32} {'p50 ms':>8} {'p99 ms':>8}")
        for name, (url, headers) in runs.items():
            xs = asyncio.run(run_rate(url, model, rate, n, headers))
            print(f"{name:<32} {pct(xs, 50):8.1f} {pct(xs, 99):8.1f}")
        rows = httpx.get(router_url + "/edgegen/v1/endpoints").json()["endpoints"]
        print("router's view: " + ", ".join(
            f"{row['node']} ewma={row['ewma_ms']}ms requests={row['requests']}" for row in rows))
    finally:
        hp.terminate()
        hp.wait(10)
        r.stop()
        for p in procs:
            p.stop()
        for proxy in proxies:
            proxy.stop()
        reg.stop()


STANDIN_MODEL = "standin-model"
STANDIN_ANSWER = {
    "id": "chatcmpl-standin", "object": "chat.completion", "created": 1764288000,
    "model": STANDIN_MODEL,
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hi"},
                 "finish_reason": "length"}],
    "usage": {"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11},
}


def standin_upstream(tmp: Path, port: int) -> subprocess.Popen:
    """A HAProxy frontend that answers every request itself: a chat.completion for any path
    (the health checks' /healthz and /readyz included), a model list for /v1/models."""
    models = {"object": "list", "data": [{"id": STANDIN_MODEL, "object": "model",
                                          "created": 0, "owned_by": "edgegen"}]}
    models_json = json.dumps(models, separators=(",", ":"))
    answer_json = json.dumps(STANDIN_ANSWER, separators=(",", ":"))
    cfg = tmp / "standin.cfg"
    cfg.write_text(f"""global
  maxconn 4096
defaults
  mode http
  timeout connect 2s
  timeout client 120s
  timeout server 120s
  option http-keep-alive
frontend standin
  bind 127.0.0.1:{port}
  acl models path /v1/models
  http-request return status 200 content-type application/json string '{models_json}' if models
  http-request return status 200 content-type application/json string '{answer_json}'
""")
    subprocess.run(["haproxy", "-c", "-q", "-f", str(cfg)], check=True)
    return subprocess.Popen(["haproxy", "-db", "-f", str(cfg)], stdout=subprocess.DEVNULL,
                            stderr=open(tmp / "standin.log", "wb"))


FLOOR_SCRIPT = Path(__file__).with_name("python_floor.py")
# name -> python_floor.py's flags: a bare callback proxy, and the same making the router's
# per-request decisions
FLOORS = {"py-floor": [], "py-floor+logic": ["--router-logic"]}


def register_standin(consul: str, port: int) -> None:
    """Register the stand-in as an edge the way `edgegen agent` registers itself
    (edge_agent/registration.py: service name, ID, Meta keys, an HTTP check)."""
    body = {
        "Name": "edgegen-edge", "ID": f"edgegen-edge-standin-{port}",
        "Address": "127.0.0.1", "Port": port, "Tags": [f"model={STANDIN_MODEL}"],
        "Meta": {"node": "standin", "region": "eu-west", "model": STANDIN_MODEL,
                 "tier": "edge"},
        "Check": {"HTTP": f"http://127.0.0.1:{port}/healthz", "Interval": "1s",
                  "Timeout": "1s", "DeregisterCriticalServiceAfter": "1m"},
    }
    httpx.put(consul + "/v1/agent/service/register", json=body, timeout=10).raise_for_status()


def cpu_seconds(pid: int) -> dict[int, float]:
    """User + system CPU seconds of ``pid`` and all its descendants (found by their ppid in
    /proc/*/stat), by pid. A process's stat counts all its threads."""
    tick = os.sysconf("SC_CLK_TCK")
    parent: dict[int, int] = {}
    used: dict[int, float] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (comm)"
        except (OSError, IndexError):
            continue
        p = int(stat.parent.name)
        parent[p] = int(fields[1])
        used[p] = (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    tree, todo = {}, [pid]
    while todo:
        p = todo.pop()
        if p in used and p not in tree:
            tree[p] = used[p]
            todo += [c for c, pp in parent.items() if pp == p]
    return tree


def cpu_used(before: dict[int, float], after: dict[int, float]) -> float:
    return sum(t - before.get(p, 0.0) for p, t in after.items())


WRK_UNITS_MS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}


def wrk_ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text)
    if not m:
        raise ValueError(f"not a wrk duration: {text!r}")
    return float(m[1]) * WRK_UNITS_MS[m[2]]


def parse_wrk(out: str) -> dict:
    """wrk 4.1's --latency report → req/s, requests, p50/p99 ms, non-2xx/3xx answers and
    socket errors (wrk prints those two lines only when they are not zero)."""
    pcts = {int(q): wrk_ms(v) for q, v in re.findall(r"^\s+(\d+)%\s+(\S+)\s*$", out, re.MULTILINE)}
    requests = re.search(r"^\s*(\d+) requests in ", out, re.MULTILINE)
    rps = re.search(r"^Requests/sec:\s+([\d.]+)", out, re.MULTILINE)
    if not (requests and rps and 50 in pcts and 99 in pcts):
        raise RuntimeError(f"could not read wrk's output:\n{out}")
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)",
                     out)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {"rps": float(rps[1]), "requests": int(requests[1]), "p50": pcts[50],
            "p99": pcts[99], "non2xx": int(non2xx[1]) if non2xx else 0,
            "sock": sum(map(int, sock.groups())) if sock else 0}


def wrk_script(tmp: Path) -> Path:
    body = {"model": STANDIN_MODEL, "messages": [{"role": "user", "content": "Hello"}],
            "max_tokens": 2, "temperature": 0}
    script = tmp / "chat.lua"
    script.write_text(f"""wrk.method = "POST"
wrk.body = {json.dumps(json.dumps(body))}
wrk.headers["Content-Type"] = "application/json"
wrk.headers["x-edgegen-region"] = "eu-west"
""")
    return script


def run_wrk(url: str, script: Path, secs: float, connections: int) -> dict:
    out = subprocess.run(["wrk", "-t1", f"-c{connections}", f"-d{secs:g}s", "--timeout", "10s",
                          "--latency", "-s", str(script), url + "/v1/chat/completions"],
                         capture_output=True, text=True, check=True, timeout=secs + 60).stdout
    return parse_wrk(out)


def bar(what: str, value: float, limit: float, unit: str, at_least: bool = False) -> None:
    """One bar: met, or missed by how much (in the bar's unit)."""
    ok = value >= limit if at_least else value <= limit
    verdict = "met" if ok else f"missed by {abs(value - limit):.2f}{unit}"
    print(f"  {what}: {value:.2f}{unit} {'>=' if at_least else '<='} {limit:.2f}{unit}  "
          f"{verdict}")


def ratio_bar(what: str, router_ms: float, haproxy_ms: float, times: float = 2.0) -> None:
    """The router's added time at most ``times`` HAProxy's, as a ratio."""
    if haproxy_ms > 0:
        bar(f"{what} ({router_ms:+.2f} / {haproxy_ms:+.2f} ms)", router_ms / haproxy_ms,
            times, "x")
    else:  # HAProxy added nothing measurable: the ratio has no meaning, the sign has
        verdict = "met" if router_ms <= 0 else f"missed by {router_ms:.2f} ms"
        print(f"  {what}: router {router_ms:+.2f} ms, HAProxy {haproxy_ms:+.2f} ms (no ratio)"
              f"  {verdict}")


def overhead(tmp: Path, rounds: int, secs: float, connections: int, trickle_rate: float,
             trickle_n: int, router_args: list[str] | tuple[str, ...] = ()) -> None:
    wrk_version = subprocess.run(["wrk", "-v"], capture_output=True, text=True,
                                 check=False).stdout.split()
    with contextlib.ExitStack() as stack:
        def started(proc: subprocess.Popen) -> subprocess.Popen:
            stack.callback(stop_process, proc, 10)
            return proc

        reg, consul = registry(tmp, "registry-c")
        stack.callback(reg.stop)
        sport = free_port()
        started(standin_upstream(tmp, sport))
        direct = f"http://127.0.0.1:{sport}"
        wait_http(direct + "/healthz", timeout=30)
        register_standin(consul, sport)
        r, router_url = router(consul, tmp, "router-c", router_args)
        stack.callback(r.stop)
        deadline = time.monotonic() + 60
        while not any(row["node"] == "standin" for row in
                      httpx.get(router_url + "/edgegen/v1/endpoints").json()["endpoints"]):
            if time.monotonic() > deadline:
                raise TimeoutError("the router did not list the stand-in edge")
            time.sleep(0.2)
        wait_http(router_url + "/readyz", timeout=30, proc=r.proc)
        hport = free_port()
        hp = started(haproxy(tmp, hport, [("127.0.0.1", sport)], "haproxy-c"))
        ha_url = f"http://127.0.0.1:{hport}"
        wait_http(ha_url + "/readyz", timeout=30)

        targets = {"direct": (direct, None), "haproxy": (ha_url, hp.pid),
                   "router": (router_url, r.pid)}
        for name, extra in FLOORS.items():   # reference points, under load only
            fport = free_port()
            fp = started(subprocess.Popen([sys.executable, str(FLOOR_SCRIPT), "--port",
                                           str(fport), "--upstream-port", str(sport), *extra]))
            wait_port(fport, fp)
            targets[name] = (f"http://127.0.0.1:{fport}", fp.pid)
        script = wrk_script(tmp)
        for url, _ in targets.values():  # warm up: connections, pools, first-call paths
            run_wrk(url, script, 1, connections)
        runs: dict[str, list[dict]] = {name: [] for name in targets}
        cpu: dict[str, float] = {name: 0.0 for name in targets}
        names = list(targets)
        for i in range(rounds):
            for name in names[i % len(names):] + names[:i % len(names)]:  # rotate who is first
                url, pid = targets[name]
                before = cpu_seconds(pid) if pid else {}
                runs[name].append(run_wrk(url, script, secs, connections))
                if pid:
                    cpu[name] += cpu_used(before, cpu_seconds(pid))

        headers = {"x-edgegen-region": "eu-west"}
        names = names[:3]
        lat: dict[str, list[float]] = {name: [] for name in names}
        for i in range(rounds):
            for name in names[i % 3:] + names[:i % 3]:
                lat[name] += asyncio.run(run_rate(targets[name][0], STANDIN_MODEL,
                                                  trickle_rate, trickle_n // rounds, headers))

    med = {name: {k: statistics.median(run[k] for run in rs) for k in ("rps", "p50", "p99")}
           for name, rs in runs.items()}
    print(f"\n3. Overhead against a stand-in upstream (HAProxy answering every request "
          f"itself), {rounds} alternating rounds, median over rounds")
    print(f"load: {' '.join(wrk_version[:2])} -t1 -c{connections} -d{secs:g}s, POST "
          f"/v1/chat/completions (a short chat request, region hint eu-west)")
    print(f"{'target':<14} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'+p50 ms':>8} "
          f"{'+p99 ms':>8} {'non-2xx':>8} {'sock err':>8} {'CPU ms/1k req':>14}")
    d = med["direct"]
    for name, m in med.items():
        total = sum(run["requests"] for run in runs[name])
        per_k = f"{cpu[name] * 1000 / total * 1000:14.1f}" if targets[name][1] and total \
            else f"{'':>14}"
        print(f"{name:<14} {m['rps']:9.0f} {m['p50']:8.2f} {m['p99']:8.2f} "
              f"{m['p50'] - d['p50']:+8.2f} {m['p99'] - d['p99']:+8.2f} "
              f"{sum(run['non2xx'] for run in runs[name]):8d} "
              f"{sum(run['sock'] for run in runs[name]):8d} {per_k}")

    print(f"trickle: {trickle_n // rounds * rounds} requests per target at {trickle_rate:g} "
          f"req/s, open loop, one keep-alive httpx client")
    print(f"{'target':<10} {'p50 ms':>8} {'p99 ms':>8} {'+p50 ms':>8} {'+p99 ms':>8}")
    t50, t99 = pct(lat["direct"], 50), pct(lat["direct"], 99)
    added = {}
    for name, xs in lat.items():
        p50, p99 = pct(xs, 50), pct(xs, 99)
        added[name] = (p50 - t50, p99 - t99)
        print(f"{name:<10} {p50:8.2f} {p99:8.2f} {p50 - t50:+8.2f} {p99 - t99:+8.2f}")

    (r50, r99), (h50, h99) = added["router"], added["haproxy"]
    print("bars (a) trickle:")
    bar("router added p50", r50, 1.0, " ms")
    bar("router added p99", r99, 5.0, " ms")
    ratio_bar("router/HAProxy added p50", r50, h50)
    ratio_bar("router/HAProxy added p99", r99, h99)
    print("bars (b) load:")
    bar(f"router/HAProxy req/s ({med['router']['rps']:.0f} / {med['haproxy']['rps']:.0f})",
        med["router"]["rps"] / med["haproxy"]["rps"], 0.5, "x", at_least=True)
    hadd99 = med["haproxy"]["p99"] - d["p99"]
    bar(f"router added p99 vs max(5 ms, 2 x HAProxy's {hadd99:+.2f} ms)",
        med["router"]["p99"] - d["p99"], max(5.0, 2 * hadd99), " ms")
    print("reference points (benchmarks/python_floor.py), req/s against HAProxy's:")
    for name in FLOORS:
        print(f"  {name}: {med[name]['rps'] / med['haproxy']['rps']:.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--part", choices=("all", "latency", "distance", "overhead"), default="all",
                    help="which part to run (default: all)")
    ap.add_argument("--bundle", type=Path, help="bundle directory (default: export a tiny one)")
    ap.add_argument("--rate", type=float, default=5.0, help="requests per second")
    ap.add_argument("--requests", type=int, default=150, help="requests per target")
    ap.add_argument("--rounds", type=int, default=3,
                    help="alternating rounds of parts 1 and 3 (default 3)")
    ap.add_argument("--duration", type=float, default=10.0,
                    help="seconds per wrk run in part 3 (default 10)")
    ap.add_argument("--connections", type=int, default=16,
                    help="wrk connections in part 3 (default 16)")
    ap.add_argument("--trickle-rate", type=float, default=40.0,
                    help="requests per second of part 3's trickle (default 40)")
    ap.add_argument("--trickle-requests", type=int, default=400,
                    help="requests per target of part 3's trickle (default 400)")
    ap.add_argument("--router-arg", action="append", default=[], metavar="ARG",
                    help="an extra argument for `edgegen router`, repeatable; write flags "
                         "with '=': --router-arg=--placement --router-arg=nearest")
    args = ap.parse_args()
    print(f"CPU: {cpu_model()}, {os.cpu_count()} cores; Python {platform.python_version()}; "
          f"haproxy {subprocess.run(['haproxy', '-v'], capture_output=True, text=True).stdout.split()[2]}")
    if args.router_arg:
        print(f"edgegen router {' '.join(args.router_arg)}")
    with tempfile.TemporaryDirectory(prefix="edgegen-bench-") as tmp_s:
        tmp = Path(tmp_s)
        if args.part in ("all", "latency", "distance"):
            bundle = args.bundle or tiny_bundle(tmp)
        if args.part in ("all", "latency"):
            added_latency(bundle, tmp, args.rate, args.requests, args.rounds, args.router_arg)
        if args.part in ("all", "distance"):
            distance(bundle, tmp, args.rate, args.requests // 2, args.router_arg)
        if args.part in ("all", "overhead"):
            overhead(tmp, args.rounds, args.duration, args.connections, args.trickle_rate,
                     args.trickle_requests, args.router_arg)
        print(f"\nlogs were in {tmp} (removed)")

if __name__ == "__main__":
    main()
