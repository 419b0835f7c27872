"""MQTT vs REST: round-trip time to the first chunk, on the same agent and prompt, in one run.

One `edgegen agent --mqtt` behind a local Mosquitto (Debian's). For each round, the same
streaming chat request goes out once over REST (OpenAI SSE on a keep-alive httpx client, what
an HTTP device would use) and once over MQTT v5 (the project's device client, connected once),
in alternating order so that drift on a shared machine hits both alike. Measured: time from
sending to the first message that carries answer text, and to the final message. Two agents
are measured: the default coalescing (50 ms / 8 tokens per MQTT message) and coalescing off
(1 token per message), which shows what the batching costs the first chunk.

    python benchmarks/mqtt_rtt.py [--bundle DIR] [--rounds 60] [--max-tokens 32]

Without --bundle a tiny random llama (SmolLM2's tokenizer) is exported first, as the tests do.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from edge_agent.mqtt.device_client import MqttChatClient  # noqa: E402
from edge_agent.mqtt.contract import AGENT_USER, answer_text  # noqa: E402
from tests.support.mosquitto import Mosquitto  # noqa: E402
from tests.support.procs import EdgegenProcess, free_port, wait_http  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from router import cpu_model, tiny_bundle  # noqa: E402


def rest_round(client: httpx.Client, url: str, body: dict) -> tuple[float, float]:
    t0 = time.perf_counter()
    first = None
    with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            if first is None and answer_text(json.loads(line[6:])):
                first = time.perf_counter() - t0
    return first if first is not None else float("nan"), time.perf_counter() - t0


def mqtt_round(device: MqttChatClient, node: str, body: dict) -> tuple[float, float]:
    t0 = time.perf_counter()
    first = None
    for reply in device.chat(body, node=node, timeout=120):
        if first is None and answer_text(reply):
            first = time.perf_counter() - t0
    return first if first is not None else float("nan"), time.perf_counter() - t0


def start_agent(bundle: str, tmp: Path, node: str, broker: Mosquitto, *extra: str):
    port = free_port()
    proc = EdgegenProcess(["agent", "--bundle", bundle, "--node", node, "--port", str(port),
                           "--threads", "2", "--mqtt", broker.url, "--mqtt-username",
                           AGENT_USER, *extra], tmp, node,
                          env={"EDGEGEN_MQTT_PASSWORD": broker.creds.agent_password()})
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/readyz", timeout=180, proc=proc.proc)
    deadline = time.monotonic() + 60
    while "edgegen_mqtt_connected 1.0" not in httpx.get(url + "/metrics").text:
        if time.monotonic() > deadline:
            raise RuntimeError("agent did not connect to the broker:\n" + proc.log()[-2000:])
        time.sleep(0.1)
    return proc, url


def summary(xs: list[float]) -> str:
    xs = sorted(x * 1000 for x in xs)
    p90 = xs[min(len(xs) - 1, int(0.9 * len(xs)))]
    return f"median {statistics.median(xs):7.1f} ms   p90 {p90:7.1f} ms"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", help="bundle directory (default: export a tiny random llama)")
    ap.add_argument("--rounds", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--max-tokens", type=int, default=32)
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="edgegen-mqtt-bench-"))
    bundle = args.bundle or str(tiny_bundle(tmp))
    body = {"messages": [{"role": "user", "content": "Describe the weather at sea."}],
            "max_tokens": args.max_tokens, "temperature": 0, "stream": True}
    print(f"machine: {cpu_model()}, {os.cpu_count()} cores")
    print(f"bundle: {bundle}\nprompt: {body['messages'][0]['content']!r}, "
          f"max_tokens {args.max_tokens}, {args.rounds} rounds (after {args.warmup} warm-up)")

    broker = Mosquitto(tmp / "mosquitto", locked=True).start()   # as edgegen ships it
    procs = []
    try:
        for label, extra in (("default coalescing (50 ms / 8 tokens)", ()),
                             ("coalescing off (1 token/message)",
                              ("--mqtt-coalesce-tokens", "1", "--mqtt-coalesce-ms", "0"))):
            node = f"bench{len(procs)}"
            proc, url = start_agent(bundle, tmp, node, broker, *extra)
            procs.append(proc)
            first = {"rest": [], "mqtt": []}
            total = {"rest": [], "mqtt": []}
            with httpx.Client(timeout=120) as http, MqttChatClient(broker.url, **broker.device_login()) as device:
                for i in range(args.warmup + args.rounds):
                    order = ("rest", "mqtt") if i % 2 == 0 else ("mqtt", "rest")
                    for kind in order:
                        f, t = (rest_round(http, url, body) if kind == "rest"
                                else mqtt_round(device, node, body))
                        if i >= args.warmup:
                            first[kind].append(f)
                            total[kind].append(t)
            print(f"\nagent with MQTT {label}")
            for kind, name in (("rest", "REST SSE "), ("mqtt", "MQTT v5  ")):
                print(f"  {name} first chunk: {summary(first[kind])}   "
                      f"whole answer: {summary(total[kind])}")
            diff = statistics.median(first["mqtt"]) - statistics.median(first["rest"])
            print(f"  MQTT - REST, median first chunk: {diff * 1000:+.1f} ms")
            proc.stop()
    finally:
        for p in procs:
            p.stop()
        broker.stop()
        shutil.rmtree(tmp, ignore_errors=True)   # the exported bundle and the logs


if __name__ == "__main__":
    main()
