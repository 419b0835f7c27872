"""Errors raised while rendering manifests and deploying.

    DeployError
    ├── RenderError             a manifest cannot be rendered or does not validate
    ├── ClusterError            the cluster cannot be reached or refuses (no kubeconfig,
    │                           unreachable API server, RBAC forbidden, no matching nodes)
    └── RolloutFailed           the rollout did not become ready; names the failing nodes
"""

from __future__ import annotations


class DeployError(Exception):
    """Base of every error the deploy code raises on purpose."""


class RenderError(DeployError):
    """A manifest cannot be rendered, or the rendered YAML does not validate."""


class ClusterError(DeployError):
    """The cluster cannot be reached, or refuses what was asked."""


class RolloutFailed(DeployError):
    """A rollout did not become ready in time."""

    def __init__(self, message: str, failing_nodes: list[str] | None = None):
        self.failing_nodes = failing_nodes or []
        super().__init__(message)
