"""The agent's Prometheus metrics (names from DESIGN.md), in a registry of its own per app.

Buckets fit LLM serving: time to first token from ~5 ms (tiny models) to 30 s (long queues),
per-output-token latency from 1 ms to 1 s, whole requests up to 10 minutes.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                10.0, 30.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25,
                0.5, 1.0)
REQUEST_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0,
                   300.0, 600.0)


class AgentMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("edgegen_requests", "Requests answered, by endpoint and HTTP status.",
                                ["endpoint", "status"], registry=r)
        self.request_duration = Histogram(
            "edgegen_request_duration_seconds", "Time from receiving a request to its last byte.",
            ["endpoint"], buckets=REQUEST_BUCKETS, registry=r)
        self.ttft = Histogram("edgegen_time_to_first_token_seconds",
                              "Time from receiving a generation request to its first token.",
                              buckets=TTFT_BUCKETS, registry=r)
        self.tpot = Histogram("edgegen_time_per_output_token_seconds",
                              "Mean time between output tokens of one request, after the first.",
                              buckets=TPOT_BUCKETS, registry=r)
        self.generated_tokens = Counter("edgegen_generated_tokens",
                                        "Completion tokens generated.", registry=r)
        self.prompt_tokens = Counter("edgegen_prompt_tokens", "Prompt tokens processed.",
                                     registry=r)
        # as vLLM counts them: hit rate = hits / queries, in tokens
        self.prefix_cache_queries = Counter(
            "edgegen_prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
            registry=r)
        self.prefix_cache_hits = Counter(
            "edgegen_prefix_cache_hits", "Prompt tokens found in the prefix cache (not read "
            "again).", registry=r)
        self.queue_depth = Gauge("edgegen_queue_depth", "Requests waiting for a decoding slot.",
                                 registry=r)
        self.inflight = Gauge("edgegen_inflight_requests",
                              "Requests being decoded or waiting for a slot.", registry=r)
        # The Gateway API Inference Extension's model-server metrics, under vLLM's names with
        # this server's prefix (and "_" where vLLM writes ":", which promtool reserves for
        # recording rules), so llm-d-style schedulers can read edgegen agents too.
        self.requests_waiting = Gauge("edgegen_num_requests_waiting",
                                      "Requests queued for a decoding slot.", registry=r)
        self.requests_running = Gauge("edgegen_num_requests_running",
                                      "Requests being decoded.", registry=r)
        self.cache_usage = Gauge("edgegen_kv_cache_usage_perc", "The prefix cache's fill, "
                                 "0 to 1 (its bytes over its budget).", registry=r)
        self.bundle_info = Gauge("edgegen_bundle_info", "The bundle being served (value 1).",
                                 ["name", "digest", "precision"], registry=r)

    def set_bundle(self, name: str, digest: str, precision: str) -> None:
        self.bundle_info.clear()
        self.bundle_info.labels(name=name, digest=digest, precision=precision).set(1)

    def render(self) -> bytes:
        return generate_latest(self.registry)
