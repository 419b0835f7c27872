"""The router's Prometheus metrics (names in DESIGN.md), one registry per app.

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
    none           bad_request     400: refused by the router (not JSON, no model, bad hint)
    none           too_large       413: a body over --max-body-bytes, refused unread
    none           body_timeout    408: a body that did not arrive in time

(413 and 408 are counted on every POST path, since the body is refused before routing.)
"""

from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily

STATES = ("healthy", "ejected", "probing", "probe-due")


class RouterMetrics:
    def __init__(self, rows: Callable[[], list[dict]]):
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "edgegen_router_requests", "Requests the router answered, by tier and outcome.",
            ["tier", "outcome"], registry=self.registry)
        self.upstream_duration = Histogram(
            "edgegen_router_upstream_duration_seconds",
            "Time from sending a request upstream to its last byte, per endpoint.",
            ["endpoint"], registry=self.registry,
            buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 120))
        self.retries = Counter("edgegen_router_retries", "Requests sent again to another "
                               "endpoint after a failure.", registry=self.registry)
        self.invalid_answers = Counter(
            "edgegen_router_upstream_invalid_answers", "Upstream answers below 500 that were "
            "not a JSON object (or a stream): retried elsewhere, never passed on.",
            registry=self.registry)
        self.invalid_load_reports = Counter(
            "edgegen_router_invalid_load_reports", "Load reports (ORCA endpoint-load-metrics) "
            "refused as malformed or impossible.", registry=self.registry)
        self.resumed = Counter("edgegen_router_streams_resumed", "Streams continued on "
                               "another endpoint after theirs broke.", registry=self.registry)
        self.fallbacks = Counter("edgegen_router_fallbacks", "Requests sent to the central tier "
                                 "because no edge could take them.", registry=self.registry)
        self.registry.register(_EndpointGauge(rows))


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
