"""Discovery benchmark: how fast a fleet change reaches the routers, and at what cost.

Against one `edgegen registry` process, N watchers follow `edgegen-edge` two ways in the
same run:

- blocking: edgegen's ServiceWatcher (Consul blocking queries, `?index=&wait=`);
- polling: a plain GET of `/v1/health/service/edgegen-edge?passing=1` every second, which is
  what a user without blocking queries would do (or what a DNS-TTL-based lookup amounts to).

A TTL check is flipped between passing and critical every 2 s; for each flip the time until
each watcher's table reflects it is recorded. Printed: p50/p99 propagation per method and
the registry requests each method made per watcher per second.

    python benchmarks/discovery.py [--watchers 50] [--flips 15]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cloud_router.discovery import ServiceWatcher, endpoints_from_health  # noqa: E402
from tests.cloud_router.registry_support import start_registry  # noqa: E402


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


class Counting(httpx.AsyncHTTPTransport):
    count = 0

    async def handle_async_request(self, request):
        Counting.count += 1
        return await super().handle_async_request(request)


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] * 1000


async def run(url: str, watchers: int, flips: int) -> None:
    async with httpx.AsyncClient(base_url=url) as c:
        for i in range(5):
            await c.put("/v1/agent/service/register", json={
                "Name": "edgegen-edge", "ID": f"e{i}", "Port": 8000 + i, "Meta": {"node": f"e{i}"},
                "Check": {"TTL": "1h", "Status": "passing"}})

        blocking = [ServiceWatcher(url, "edgegen-edge", transport=Counting())
                    for _ in range(watchers)]
        polled: list[list[str]] = [[] for _ in range(watchers)]
        poll_count = [0]

        async def poller(i: int) -> None:
            async with httpx.AsyncClient(base_url=url) as pc:
                while True:
                    r = await pc.get("/v1/health/service/edgegen-edge", params={"passing": 1})
                    poll_count[0] += 1
                    polled[i] = sorted(e.id for e in endpoints_from_health(r.json()))
                    await asyncio.sleep(1.0)

        tasks = [asyncio.create_task(w.run()) for w in blocking]
        tasks += [asyncio.create_task(poller(i)) for i in range(watchers)]
        await asyncio.sleep(3)
        Counting.count, poll_count[0] = 0, 0
        t_start = time.monotonic()
        lat_block: list[float] = []
        lat_poll: list[float] = []
        for n in range(flips):
            failing = n % 2 == 0
            expected = ["e1", "e2", "e3", "e4"] if failing else ["e0", "e1", "e2", "e3", "e4"]
            verb = "fail" if failing else "pass"
            t0 = time.monotonic()
            await c.put(f"/v1/agent/check/{verb}/service:e0")
            pending_b = set(range(watchers))
            pending_p = set(range(watchers))
            while (pending_b or pending_p) and time.monotonic() - t0 < 5:
                now = time.monotonic() - t0
                for i in list(pending_b):
                    if sorted(e.id for e in blocking[i].endpoints) == expected:
                        lat_block.append(now)
                        pending_b.discard(i)
                for i in list(pending_p):
                    if polled[i] == expected:
                        lat_poll.append(now)
                        pending_p.discard(i)
                await asyncio.sleep(0.002)
            await asyncio.sleep(max(0.0, 2.0 - (time.monotonic() - t0)))
        elapsed = time.monotonic() - t_start
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    print(f"\n{watchers} watchers, {flips} flips, {elapsed:.0f} s")
    print(f"{'method':<28}{'p50 ms':>10}{'p99 ms':>10}{'req/watcher/s':>16}")
    print(f"{'blocking (ServiceWatcher)':<28}{pct(lat_block, .5):>10.1f}{pct(lat_block, .99):>10.1f}"
          f"{Counting.count / watchers / elapsed:>16.2f}")
    print(f"{'polling every 1 s':<28}{pct(lat_poll, .5):>10.1f}{pct(lat_poll, .99):>10.1f}"
          f"{poll_count[0] / watchers / elapsed:>16.2f}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--watchers", type=int, default=50)
    ap.add_argument("--flips", type=int, default=15)
    args = ap.parse_args()
    print(f"CPU: {cpu_model()}, {os.cpu_count()} cores; python {platform.python_version()}")
    with tempfile.TemporaryDirectory() as tmp:
        proc, url = start_registry(Path(tmp))
        try:
            asyncio.run(run(url, args.watchers, args.flips))
        finally:
            proc.stop()


if __name__ == "__main__":
    main()
