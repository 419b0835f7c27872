"""Errors raised while rendering manifests and deploying.

    DeployError
    ├── RenderError             a manifest cannot be rendered or does not validate
    ├── ClusterError            the cluster cannot be reached or refuses (no kubeconfig,
    │   │                       unreachable API server, RBAC forbidden, no matching nodes,
    │   │                       bundle not reachable from the cluster)
    │   ├── Forbidden           RBAC refused a request (HTTP 403)
    │   ├── ResourceNotFound    the object does not exist (HTTP 404)
    │   └── ApplyConflict       server-side apply met fields another manager owns (HTTP 409)
    ├── RolloutFailed           the rollout did not become ready; names the failing nodes
    └── LocalFleetError         a local process (agent, router, registry, broker) did not start
"""

from __future__ import annotations


class DeployError(Exception):
    """Base of every error the deploy code raises on purpose."""


class RenderError(DeployError):
    """A manifest cannot be rendered, or the rendered YAML does not validate."""


class ClusterError(DeployError):
    """The cluster cannot be reached, or refuses what was asked."""


class Forbidden(ClusterError):
    """The API server's RBAC refused the request (403)."""


class ResourceNotFound(ClusterError):
    """The object asked for does not exist (404)."""


class ApplyConflict(ClusterError):
    """Server-side apply conflicts with fields another field manager owns (409)."""


class RolloutFailed(DeployError):
    """A rollout did not become ready in time."""

    def __init__(self, message: str, failing_nodes: list[str] | None = None):
        self.failing_nodes = failing_nodes or []
        super().__init__(message)


class LocalFleetError(DeployError):
    """A process of a local fleet exited or never became ready."""
