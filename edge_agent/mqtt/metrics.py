"""Prometheus metrics of the MQTT bridge, registered in the agent's own registry (the one its
``/metrics`` serves; see ``metrics.AgentMetrics``) so they appear beside the REST metrics."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

# ok | bad_request (malformed, not a chat request, too large, refused by serving) |
# rate_limited (the shared queue was full) | no_reply_route (nobody to answer) |
# forbidden_reply_route (a reply route outside edgegen/v1/reply/<client id>) | error (ours)
STATUSES = ("ok", "bad_request", "rate_limited", "no_reply_route", "forbidden_reply_route",
            "error")


class MqttMetrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry if registry is not None else CollectorRegistry()
        self.requests = Counter("edgegen_mqtt_requests", "MQTT chat requests, by outcome.",
                                ["status"], registry=self.registry)
        self.connected = Gauge("edgegen_mqtt_connected",
                               "1 while the bridge is connected to its MQTT broker and subscribed.",
                               registry=self.registry)
        for status in STATUSES:
            self.requests.labels(status)

    def count(self, status: str) -> None:
        self.requests.labels(status).inc()

    def value(self, status: str) -> float:
        """The counter's current value (for tests and the benchmark)."""
        return self.registry.get_sample_value("edgegen_mqtt_requests_total",
                                              {"status": status}) or 0.0
