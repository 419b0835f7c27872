"""Stand-ins for edge agents that follow their desired state, for rollout tests that do not
need real models: the API flow of `edgegen deploy --target k3s` against the fake Kubernetes
API. The real follower (``edge_agent.follower``) is tested with real agents in
``tests/e2e/test_fleet_rollout.py``; these keep its contract (``edge_agent.desired``):

- register in the catalog as ``edgegen-edge`` with the node's name and region in Meta;
- watch ``edgegen/nodes/<node>/desired`` with blocking queries; "fetch" at once (or fail for
  a digest in ``unfetchable``), report ``ready``; switch when told, keep the old digest as
  ``last_good``; report every step in ``edgegen/nodes/<node>/status``;
- serve ``/metrics`` in Prometheus text, whose counters grow with time as if the node
  answered ``rate`` requests a second (20 by default), with a time to first token of 2 s on
  a digest in ``slow`` and 50 ms otherwise.
"""

from __future__ import annotations

import base64
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from edge_agent.desired import Desired, NodeStatus, desired_key, status_key

BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5)


class FakeNode:
    def __init__(self, consul: str, node: str, region: str, serving: str,
                 slow: set[str] | None = None, unfetchable: set[str] | None = None,
                 rate: float = 20.0):
        self.consul, self.node, self.region, self.rate = consul, node, region, rate
        self.serving, self.last_good, self.ready = serving, None, None
        self.slow, self.unfetchable = slow if slow is not None else set(), \
            unfetchable if unfetchable is not None else set()
        self.switches: list[str] = []
        self._metrics = CollectorRegistry()
        self._requests = Counter("edgegen_requests", "", ["endpoint", "status"],
                                 registry=self._metrics)
        self._ttft = Histogram("edgegen_time_to_first_token_seconds", "", buckets=BUCKETS,
                               registry=self._metrics)
        self._tokens = Counter("edgegen_generated_tokens", "", registry=self._metrics)
        self._last = time.monotonic()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                body = outer._exposition() if self.path == "/metrics" else b"ready"
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._threads = [threading.Thread(target=self._server.serve_forever, daemon=True),
                         threading.Thread(target=self._follow, daemon=True)]

    def start(self) -> FakeNode:
        host, port = self._server.server_address
        httpx.put(f"{self.consul}/v1/agent/service/register", timeout=5, json={
            "ID": f"edgegen-edge-{self.node}", "Name": "edgegen-edge", "Address": host,
            "Port": port, "Meta": {"node": self.node, "region": self.region,
                                   "digest": self.serving[:12], "tier": "edge"}},
        ).raise_for_status()
        self._report("serving")
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._server.shutdown()
        self._server.server_close()

    def _exposition(self) -> bytes:
        with self._lock:
            now = time.monotonic()
            n = int((now - self._last) * self.rate)
            if n:
                self._last = now
                ttft = 2.0 if self.serving in self.slow else 0.05
                self._requests.labels("/v1/chat/completions", "200").inc(n)
                self._tokens.inc(10 * n)
                for _ in range(n):
                    self._ttft.observe(ttft)
            return generate_latest(self._metrics)

    def _report(self, state: str, error: str | None = None, rollout: str = "") -> None:
        status = NodeStatus(serving=self.serving, state=state, last_good=self.last_good,
                            ready=self.ready, error=error, rollout=rollout, at=time.time())
        httpx.put(f"{self.consul}/v1/kv/{status_key(self.node)}", content=status.to_json(),
                  timeout=5)

    def _follow(self) -> None:
        index = 0
        while not self._stop.is_set():
            try:
                r = httpx.get(f"{self.consul}/v1/kv/{desired_key(self.node)}",
                              params={"index": index, "wait": "1s"}, timeout=10)
                index = int(r.headers.get("X-Consul-Index", index))
                if r.status_code == 200:
                    self._apply(Desired.from_json(base64.b64decode(r.json()[0]["Value"])))
            except (httpx.HTTPError, ValueError):
                time.sleep(0.2)   # the registry is away: serve on, ask again

    def _apply(self, desired: Desired) -> None:
        if desired.digest == self.serving:
            self._report("serving", rollout=desired.rollout)
            return
        if desired.digest in self.unfetchable:
            self._report("failed", f"bundle {desired.digest[:12]} failed verification",
                         desired.rollout)
            return
        self.ready = desired.digest
        if not desired.switch:
            self._report("ready", rollout=desired.rollout)
            return
        with self._lock:
            self.last_good, self.serving, self.ready = self.serving, desired.digest, None
        self.switches.append(desired.digest)
        self._report("serving", rollout=desired.rollout)


def status(consul: str, node: str) -> dict:
    r = httpx.get(f"{consul}/v1/kv/{status_key(node)}", params={"raw": "true"}, timeout=5)
    return json.loads(r.content)
