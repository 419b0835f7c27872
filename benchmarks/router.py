"""Router benchmark, run in one go on one machine (prints the CPU model and core count).

1. Added latency: the same short chat requests, at a fixed rate (open loop), sent to an agent
   directly, through `edgegen router`, and through HAProxy (Debian's, the reference proxy a
   user would put in front instead); p50/p99 of each and of the difference to direct. The
   three targets alternate in rounds so that drift on a shared machine hits all alike.
2. Distance: three agents behind WAN proxies 5/40/120 ms away (one-way delay per direction);
   end-to-end p50 through the router choosing the nearest (region hint, and no hint at all so
   it learns from its latency EWMA) versus HAProxy round-robin across the three.

    python benchmarks/router.py [--bundle DIR] [--rate 20] [--requests 240]

Without --bundle a tiny random llama (SmolLM2's tokenizer) is exported first, as the tests do.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.support.procs import EdgegenProcess, free_port, wait_http  # noqa: E402
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


def router(consul, tmp, name):
    port = free_port()
    p = EdgegenProcess(["router", "--consul", consul, "--port", str(port)], tmp, name)
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/readyz", timeout=120, proc=p.proc)
    return p, url


def added_latency(bundle: Path, tmp: Path, rate: float, n: int, rounds: int = 3) -> None:
    reg, consul = registry(tmp, "registry-a")
    port = free_port()
    a = agent(bundle, "bench-a", port, consul, tmp)
    direct = f"http://127.0.0.1:{port}"
    wait_http(direct + "/readyz", timeout=120, proc=a.proc)
    r, router_url = router(consul, tmp, "router-a")
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


def distance(bundle: Path, tmp: Path, rate: float, n: int) -> None:
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
    r, router_url = router(consul, tmp, "router-b")
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", type=Path, help="bundle directory (default: export a tiny one)")
    ap.add_argument("--rate", type=float, default=5.0, help="requests per second")
    ap.add_argument("--requests", type=int, default=150, help="requests per target")
    args = ap.parse_args()
    print(f"CPU: {cpu_model()}, {os.cpu_count()} cores; Python {platform.python_version()}; "
          f"haproxy {subprocess.run(['haproxy', '-v'], capture_output=True, text=True).stdout.split()[2]}")
    with tempfile.TemporaryDirectory(prefix="edgegen-bench-") as tmp_s:
        tmp = Path(tmp_s)
        bundle = args.bundle or tiny_bundle(tmp)
        added_latency(bundle, tmp, args.rate, args.requests)
        distance(bundle, tmp, args.rate, args.requests // 2)
        print(f"\nlogs were in {tmp} (removed)")


if __name__ == "__main__":
    main()
