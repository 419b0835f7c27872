"""The router's Prometheus metrics (names in DESIGN.md), one registry per app; with several
workers (``cloud_router.workers``) the counters and histograms of all of them.

``edgegen_router_requests_total{tier,outcome}`` counts every POST to the forwarded OpenAI
paths once, by whoever decides its outcome: the forwarder for what it forwarded or could not
place, the app for what it refuses before forwarding (the router's own pages and FastAPI's
404/405 are not counted). Label values:

    tier           outcome         the request
    edge|central   ok              answered below 400, or streamed to its end
    edge|central   client_error    answered 4xx by the upstream (not 429), passed on
    edge|central   upstream_error  every try failed: the last 5xx/429 passed on, or a 503
    edge|central   stream_broken   its stream broke after the first byte and could not be
                                   continued elsewhere (``resume``)
    edge|central   cancelled       its client left during the stream
    none           no_endpoint     503: no endpoint serves its model now
    none           unauthorized    401: refused by the router, no valid API key
    none           unknown_model   404: refused by the router, no endpoint ever served it
    none           bad_request     400: refused by the router (not JSON, no model, bad hint,
                                   not HTTP); 405: not a POST
    none           too_large       413: a body over --max-body-bytes, refused unread; 431: a
                                   request head over 64 KiB
    none           body_timeout    408: a body that did not arrive in time

(413 and 408 are counted on every POST path, since the body is refused before routing.)
"""

from __future__ import annotations

import os
from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, multiprocess
from prometheus_client.core import GaugeMetricFamily

STATES = ("healthy", "ejected", "probing", "probe-due")
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"   # prometheus-client's; cloud_router.workers sets it


def counters_registry(registry: CollectorRegistry) -> CollectorRegistry | None:
    """Where a counter or histogram registers: ``registry``, or nowhere when this process is
    one of several workers, whose values live in shared files that ``registry`` collects
    (counting them live too would count this worker's twice)."""
    if os.environ.get(MULTIPROC_ENV):
        return None
    return registry


class RouterMetrics:
    def __init__(self, rows: Callable[[], list[dict]]):
        self.registry = CollectorRegistry()
        registry = counters_registry(self.registry)
        if registry is None:   # every worker's counters, whichever worker is scraped
            multiprocess.MultiProcessCollector(self.registry)
        self.requests = Counter(
            "edgegen_router_requests", "Requests the router answered, by tier and outcome.",
            ["tier", "outcome"], registry=registry)
        self.upstream_duration = Histogram(
            "edgegen_router_upstream_duration_seconds",
            "Time from sending a request upstream to its last byte, per endpoint.",
            ["endpoint"], registry=registry,
            buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 120))
        self.retries = Counter("edgegen_router_retries", "Requests sent again to another "
                               "endpoint after a failure.", registry=registry)
        self.invalid_answers = Counter(
            "edgegen_router_upstream_invalid_answers", "Upstream answers below 500 that were "
            "not a JSON object (or a stream): retried elsewhere, never passed on.",
            registry=registry)
        self.invalid_load_reports = Counter(
            "edgegen_router_invalid_load_reports", "Load reports (ORCA endpoint-load-metrics) "
            "refused as malformed or impossible.", registry=registry)
        self.resumed = Counter("edgegen_router_streams_resumed", "Streams continued on "
                               "another endpoint after theirs broke.", registry=registry)
        self.fallbacks = Counter("edgegen_router_fallbacks", "Requests sent to the central tier "
                                 "because no edge could take them.", registry=registry)
        self.registry.register(_EndpointGauge(rows))   # this worker's view
        self._children: dict[tuple, object] = {}

    def count(self, tier: str, outcome: str) -> None:
        """One request in ``edgegen_router_requests_total``."""
        self._child(self.requests, tier, outcome).inc()

    def upstream_seconds(self, endpoint_id: str, seconds: float) -> None:
        self._child(self.upstream_duration, endpoint_id).observe(seconds)

    def _child(self, metric, *labels):
        """``metric.labels(*labels)``, remembered: ``labels`` takes a lock and checks the
        values on every call, twice per forwarded request."""
        key = (metric, *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child


class _EndpointGauge:
    """edgegen_router_endpoints{tier,state}, computed from the table at scrape time."""

    def __init__(self, rows: Callable[[], list[dict]]):
        self._rows = rows

    def describe(self):
        return []

    def collect(self):
        g = GaugeMetricFamily("edgegen_router_endpoints", "Endpoints known, by tier and state.",
                              labels=["tier", "state"])
        counts = {(t, s): 0 for t in ("edge", "central") for s in STATES}
        for row in self._rows():
            counts[(row["tier"], row["state"])] = counts.get((row["tier"], row["state"]), 0) + 1
        for (tier, state), n in sorted(counts.items()):
            g.add_metric([tier, state], n)
        yield g
