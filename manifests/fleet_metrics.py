"""Where a rollout reads each agent's counters for its health gates (``manifests.gates``):

- ``ScrapeMetrics``: the agent's own ``/metrics`` at the address it registered in Consul
  (a local fleet, or an operator inside the cluster's network);
- ``PodProxyMetrics``: the same page through the Kubernetes API server's pod proxy, so that
  `edgegen deploy --target k3s` needs nothing but the kubeconfig;
- ``PrometheusMetrics``: a Prometheus server that scrapes the agents (``--prometheus``). Its
  series must carry ``instance="<address>:<port>"`` as the agent registered itself in Consul,
  which is what Prometheus's ``consul_sd_configs`` and ``kubernetes_sd_configs`` (role pod)
  give by default.

Each answers ``snapshot(agent)`` with a ``MetricsSnapshot``, or None when the agent's figures
cannot be read now: a node without figures for a window is left out of it, not failed.
"""

from __future__ import annotations

import logging
from typing import Protocol

import httpx

from manifests.consul_kv import Agent
from manifests.errors import ClusterError
from manifests.gates import (
    SERIES,
    MetricsError,
    MetricsSnapshot,
    parse_metrics,
    snapshot,
)

log = logging.getLogger(__name__)


class MetricsSource(Protocol):
    def snapshot(self, agent: Agent) -> MetricsSnapshot | None: ...


class ScrapeMetrics:
    """GET the agent's ``/metrics`` directly."""

    def __init__(self, timeout: float = 5.0):
        self._http = httpx.Client(timeout=timeout)

    def snapshot(self, agent: Agent) -> MetricsSnapshot | None:
        try:
            return parse_metrics(self._http.get(agent.url + "/metrics").raise_for_status().text)
        except (httpx.HTTPError, MetricsError) as exc:
            log.info("no metrics from an agent", extra={"node": agent.node, "error": str(exc)})
            return None


class PodProxyMetrics:
    """GET ``/metrics`` of the node's edge pod through the API server's pod proxy."""

    def __init__(self, kube, namespace: str, port: int, pod_selector: str):
        self.kube, self.namespace, self.port, self.selector = kube, namespace, port, pod_selector

    def snapshot(self, agent: Agent) -> MetricsSnapshot | None:
        try:
            pods = [p for p in self.kube.list("v1", "Pod", self.namespace, self.selector)
                    if (p.get("spec") or {}).get("nodeName") == agent.node]
            if not pods:
                return None
            name = pods[0]["metadata"]["name"]
            with self.kube.proxy_client(self.namespace, "Pod", name, self.port) as http:
                return parse_metrics(http.get("/metrics").raise_for_status().text)
        except (ClusterError, httpx.HTTPError, MetricsError) as exc:
            log.info("no metrics from an agent", extra={"node": agent.node, "error": str(exc)})
            return None


class PrometheusMetrics:
    """The agent's latest samples from Prometheus's HTTP API (an instant query)."""

    def __init__(self, url: str, timeout: float = 10.0):
        self.url = url.rstrip("/")
        self._http = httpx.Client(timeout=timeout)

    def snapshot(self, agent: Agent) -> MetricsSnapshot | None:
        instance = agent.url.split("://", 1)[-1].rstrip("/")
        query = f'{{__name__=~"{SERIES}",instance="{_escape(instance)}"}}'
        try:
            r = self._http.get(f"{self.url}/api/v1/query", params={"query": query})
            body = r.json()
            if r.status_code != 200 or body.get("status") != "success":
                raise MetricsError(f"Prometheus answered {r.status_code}: "
                                   f"{body.get('error', r.text[:200])}")
            result = body["data"]["result"]
            if not result:
                return None    # not scraped (yet): no figures, like an agent that is down
            return snapshot((s["metric"]["__name__"], s["metric"], float(s["value"][1]))
                            for s in result)
        except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
            log.warning("cannot read an agent's metrics from Prometheus",
                        extra={"node": agent.node, "prometheus": self.url, "error": str(exc)})
            return None


def _escape(value: str) -> str:
    """A PromQL double-quoted string's content."""
    return value.replace("\\", "\\\\").replace('"', '\\"')
