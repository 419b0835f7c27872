"""The only module that talks to the Kubernetes API.

It uses the ``kubernetes`` client for what that does well (kubeconfig and contexts, in-cluster
config, credentials, TLS, the HTTP pool) and sends plain JSON over its transport, so the rest
of the deploy code works on the same dicts the API documents. Server-side apply is a PATCH
with ``application/apply-patch+yaml`` and ``fieldManager=edgegen``. Every failure of the
client or the network becomes a `manifests.errors.ClusterError` (or a subclass) here.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Iterator
from urllib.parse import urlencode

from manifests.errors import ApplyConflict, ClusterError, Forbidden, ResourceNotFound

log = logging.getLogger(__name__)

FIELD_MANAGER = "edgegen"

# (apiVersion, kind) -> (plural, namespaced): the kinds edgegen renders or reads. A static
# table instead of API discovery: fewer round trips, and a clear error for anything else.
RESOURCES: dict[tuple[str, str], tuple[str, bool]] = {
    ("v1", "Namespace"): ("namespaces", False),
    ("v1", "Node"): ("nodes", False),
    ("v1", "Pod"): ("pods", True),
    ("v1", "ConfigMap"): ("configmaps", True),
    ("v1", "Service"): ("services", True),
    ("v1", "ServiceAccount"): ("serviceaccounts", True),
    ("apps/v1", "DaemonSet"): ("daemonsets", True),
    ("apps/v1", "Deployment"): ("deployments", True),
    ("traefik.io/v1alpha1", "IngressRoute"): ("ingressroutes", True),
    ("traefik.io/v1alpha1", "Middleware"): ("middlewares", True),
    ("helm.cattle.io/v1", "HelmChart"): ("helmcharts", True),
}


def resource_path(api_version: str, kind: str, namespace: str | None = None,
                  name: str | None = None) -> str:
    """The REST path of a collection or an object, e.g. /apis/apps/v1/namespaces/x/daemonsets/y."""
    try:
        plural, namespaced = RESOURCES[(api_version, kind)]
    except KeyError:
        raise ClusterError(f"edgegen does not know how to apply {api_version} {kind}") from None
    base = f"/api/{api_version}" if "/" not in api_version else f"/apis/{api_version}"
    if namespaced:
        if not namespace:
            raise ClusterError(f"{kind} {name or ''} needs a namespace")
        base += f"/namespaces/{namespace}"
    path = f"{base}/{plural}"
    return f"{path}/{name}" if name else path


def _status_message(status: int, body: bytes) -> str:
    """The ``message`` of the API's Status object, or the raw body."""
    try:
        doc = json.loads(body or b"{}")
        if isinstance(doc, dict) and doc.get("message"):
            return str(doc["message"])
    except ValueError:
        pass
    return (body or b"").decode(errors="replace")[:300] or f"HTTP {status}"


class KubeClient:
    """A connection to one cluster (one kubeconfig context)."""

    def __init__(self, api_client, description: str = ""):
        self._api = api_client
        self.host = api_client.configuration.host
        self.description = description or self.host

    @classmethod
    def connect(cls, kubeconfig: str | None = None, context: str | None = None,
                request_timeout: float = 15.0) -> "KubeClient":
        """Load credentials like kubectl: --kubeconfig, else $KUBECONFIG, else ~/.kube/config,
        else the in-cluster service account."""
        from kubernetes import client, config
        from kubernetes.config.config_exception import ConfigException

        cfg = client.Configuration()
        path = kubeconfig or os.environ.get("KUBECONFIG") or os.path.expanduser("~/.kube/config")
        try:
            if kubeconfig or os.path.exists(path.split(os.pathsep)[0]):
                if kubeconfig and not os.path.exists(kubeconfig):
                    raise ClusterError(f"no kubeconfig at {kubeconfig}")
                config.load_kube_config(config_file=path, context=context,
                                        client_configuration=cfg)
                where = f"{path}" + (f" (context {context})" if context else "")
            elif os.environ.get("KUBERNETES_SERVICE_HOST"):
                config.load_incluster_config(client_configuration=cfg)
                where = "in-cluster service account"
            else:
                raise ClusterError(
                    "no kubeconfig found: pass --kubeconfig, set KUBECONFIG, or copy "
                    "/etc/rancher/k3s/k3s.yaml from the K3s server to ~/.kube/config"
                )
        except ConfigException as exc:
            raise ClusterError(f"cannot load the kubeconfig {path}: {exc}") from exc
        cfg.retries = 1  # fail fast on an unreachable API server
        api = client.ApiClient(configuration=cfg)
        self = cls(api, where)
        self.request_timeout = request_timeout
        return self

    request_timeout: float = 15.0

    # -- the transport ----------------------------------------------------------------

    def _send(self, method: str, path: str, query: dict | None = None, body=None,
              content_type: str | None = None, timeout: float | None = None, stream=False):
        import urllib3
        from kubernetes.client.exceptions import ApiException

        url_path = path + (f"?{urlencode(query)}" if query else "")
        headers = {"Accept": "application/json"}
        if content_type:
            headers["Content-Type"] = content_type
        try:
            method, url, headers, body, _ = self._api.param_serialize(
                method, url_path, header_params=headers, body=body,
                auth_settings=["BearerToken"],
            )
            resp = self._api.call_api(method, url, header_params=headers, body=body,
                                      _request_timeout=timeout or self.request_timeout)
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise ClusterError(
                f"cannot reach the Kubernetes API server at {self.host}: {exc}"
            ) from exc
        except ApiException as exc:
            raise ClusterError(f"the Kubernetes API request failed: {exc.reason}") from exc
        if resp.status >= 400:
            raise self._error(resp.status, resp.read(), method, path)
        return resp if stream else json.loads(resp.read() or b"{}")

    def _error(self, status: int, body: bytes, method: str, path: str) -> ClusterError:
        msg = _status_message(status, body)
        if status == 401:
            return ClusterError(f"the API server at {self.host} refused our credentials "
                                f"(401): {msg}; refresh the kubeconfig")
        if status == 403:
            return Forbidden(f"RBAC forbids this ({method} {path}): {msg}. Ask a cluster "
                             "admin for a Role that allows it, or use another --context")
        if status == 404:
            return ResourceNotFound(msg)
        if status == 409:
            return ApplyConflict(
                f"{msg}. Another field manager owns these fields; re-run with "
                "--force-conflicts to take them over"
            )
        return ClusterError(f"{method} {path} failed with HTTP {status}: {msg}")

    # -- operations -------------------------------------------------------------------

    def apply(self, doc: dict, force: bool = False) -> dict:
        """Server-side apply of one object; returns the object as the server stored it."""
        meta = doc["metadata"]
        path = resource_path(doc["apiVersion"], doc["kind"], meta.get("namespace"), meta["name"])
        query = {"fieldManager": FIELD_MANAGER}
        if force:
            query["force"] = "true"
        return self._send("PATCH", path, query, doc, "application/apply-patch+yaml")

    def get(self, api_version: str, kind: str, name: str, namespace: str | None = None
            ) -> dict | None:
        """The object, or None when it does not exist."""
        try:
            return self._send("GET", resource_path(api_version, kind, namespace, name))
        except ResourceNotFound:
            return None

    def list(self, api_version: str, kind: str, namespace: str | None = None,
             label_selector: str | None = None) -> list[dict]:
        query = {"labelSelector": label_selector} if label_selector else None
        return self._send("GET", resource_path(api_version, kind, namespace), query)["items"]

    def watch(self, api_version: str, kind: str, namespace: str, name: str,
              timeout_s: int, resource_version: str | None = None) -> Iterator[dict]:
        """Watch events ({type, object}) for one object until the server ends the watch
        after ``timeout_s`` seconds; from ``resource_version`` on, when given, so only
        changes after that read are reported."""
        query = {"watch": "true", "fieldSelector": f"metadata.name={name}",
                 "timeoutSeconds": str(int(timeout_s))}
        if resource_version:
            query["resourceVersion"] = resource_version
        path = resource_path(api_version, kind, namespace)
        resp = self._send("GET", path, query, timeout=timeout_s + 10, stream=True)
        import urllib3

        try:
            buf = b""
            for chunk in resp.response.stream(4096, decode_content=True):
                buf += chunk
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    if line.strip():
                        event = json.loads(line)
                        if event.get("type") == "ERROR":
                            obj = event.get("object") or {}
                            raise ClusterError(f"watch failed: {obj.get('message', obj)}")
                        yield event
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise ClusterError(f"the watch on {kind}/{name} broke: {exc}") from exc
        finally:
            resp.response.release_conn()

    def proxy_client(self, namespace: str, kind: str, name: str, port: int,
                     timeout: float = 15.0):
        """An ``httpx.Client`` whose base URL is the API server's proxy to a Service's or a
        Pod's port (``/api/v1/namespaces/NS/services/NAME:PORT/proxy``), with this
        connection's credentials and TLS settings: how the deploy reaches the cluster's
        Consul and the agents' ``/metrics`` without a port-forward or a public address."""
        import ssl

        import httpx

        plural = {"Service": "services", "Pod": "pods"}[kind]
        c = self._api.configuration
        verify: ssl.SSLContext | bool = False
        if c.verify_ssl:
            verify = ssl.create_default_context(cafile=c.ssl_ca_cert or None)
            if c.cert_file:
                verify.load_cert_chain(c.cert_file, c.key_file)

        class _Bearer(httpx.Auth):   # read per request: the kubeconfig may refresh tokens
            def auth_flow(self, request):
                token = (c.auth_settings().get("BearerToken") or {}).get("value")
                if token:
                    request.headers["Authorization"] = token
                yield request

        base = f"{self.host}/api/v1/namespaces/{namespace}/{plural}/{name}:{port}/proxy"
        return httpx.Client(base_url=base, auth=_Bearer(), verify=verify, timeout=timeout)

    def close(self) -> None:
        self._api.close()
