"""The operator's side of Consul for a fleet rollout: the KV store (desired state, node
status, the rollout's lock and control keys) and the catalog of edge agents, over Consul's
HTTP API (the embedded registry or a real Consul alike). Errors are ``RegistryUnreachable``
(the rollout pauses and retries) or ``DeployError`` (a refusal: wrong token, bad request).
"""

from __future__ import annotations

import base64
from dataclasses import dataclass

import httpx

from manifests.errors import DeployError

EDGE_SERVICE = "edgegen-edge"   # the agents' Consul service (edge_agent.registration)


class RegistryUnreachable(DeployError):
    """Consul did not answer; the caller waits and tries again."""


@dataclass(frozen=True)
class Agent:
    """One edge agent as the catalog lists it."""

    node: str
    group: str          # its region: waves go group by group
    url: str            # where its /metrics are
    digest12: str       # the bundle it registered with
    healthy: bool


class ConsulKV:
    def __init__(self, address: str, token: str | None = None, timeout: float = 5.0,
                 http: httpx.Client | None = None):
        """Consul at ``address``; or over ``http``, a client already pointed at it (the
        Kubernetes API server's proxy to the cluster's Consul, ``KubeClient.proxy_client``)."""
        base = address if "://" in address else f"http://{address}"
        self.address = base.rstrip("/")
        self._http = http or httpx.Client(base_url=self.address, timeout=timeout)
        if token:
            self._http.headers["X-Consul-Token"] = token

    def close(self) -> None:
        self._http.close()

    def _send(self, method: str, path: str, **kw) -> httpx.Response:
        try:
            r = self._http.request(method, path, **kw)
        except httpx.TransportError as exc:
            raise RegistryUnreachable(f"consul at {self.address}: {exc}") from exc
        if r.status_code >= 500:
            raise RegistryUnreachable(f"consul at {self.address} answered {r.status_code}")
        if r.status_code in (401, 403):
            status = _kubernetes_status(r)
            if status is not None:   # the API server's proxy refused, before Consul
                raise DeployError(f"the Kubernetes API server refused the request to Consul "
                                  f"({r.status_code}): {status}")
            raise DeployError(f"consul at {self.address} refused the token ({r.status_code}): "
                              f"{r.text.strip()} -- the rollout needs key:write on edgegen/")
        return r

    def get(self, key: str) -> bytes | None:
        r = self._send("GET", f"/v1/kv/{key}")
        if r.status_code == 404:
            return None
        self._raise(r)
        value = r.json()[0].get("Value")
        return base64.b64decode(value) if value else b""

    def get_prefix(self, prefix: str) -> dict[str, bytes]:
        r = self._send("GET", f"/v1/kv/{prefix}", params={"recurse": "true"})
        if r.status_code == 404:
            return {}
        self._raise(r)
        return {e["Key"]: base64.b64decode(e["Value"]) if e.get("Value") else b""
                for e in r.json()}

    def put(self, key: str, value: bytes, *, cas: int | None = None) -> bool:
        params = {"cas": str(cas)} if cas is not None else {}
        r = self._send("PUT", f"/v1/kv/{key}", content=value, params=params)
        self._raise(r)
        return r.json() is True

    def delete(self, key: str) -> bool:
        r = self._send("DELETE", f"/v1/kv/{key}")
        self._raise(r)
        return r.json() is True

    def edge_agents(self) -> list[Agent]:
        """Every edge agent the catalog knows, healthy or not."""
        r = self._send("GET", f"/v1/health/service/{EDGE_SERVICE}")
        self._raise(r)
        agents = []
        for entry in r.json():
            svc = entry.get("Service") or {}
            meta = svc.get("Meta") or {}
            host = svc.get("Address") or (entry.get("Node") or {}).get("Address", "")
            healthy = all(c.get("Status") == "passing" for c in entry.get("Checks") or [])
            agents.append(Agent(node=meta.get("node", svc.get("ID", "")),
                                group=meta.get("region", ""),
                                url=f"http://{host}:{svc.get('Port')}",
                                digest12=meta.get("digest", ""), healthy=healthy))
        return agents

    @staticmethod
    def _raise(r: httpx.Response) -> None:
        if r.status_code >= 400:
            raise DeployError(f"consul answered {r.status_code} to {r.request.method} "
                              f"{r.request.url.path}: {r.text.strip()[:200]}")


def _kubernetes_status(r: httpx.Response) -> str | None:
    """The message of a Kubernetes ``Status`` answer (from the API server's proxy), or None."""
    try:
        body = r.json()
    except ValueError:
        return None
    if isinstance(body, dict) and body.get("kind") == "Status":
        return str(body.get("message", ""))
    return None
