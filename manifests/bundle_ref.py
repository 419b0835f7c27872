"""Turn the BUNDLE argument of `edgegen deploy` into a `BundleRef` the cluster can pull."""

from __future__ import annotations

from pathlib import Path

from edge_agent.bundle import open_bundle
from edge_agent.errors import AgentError
from manifests.errors import ClusterError, RenderError
from manifests.render import BundleRef


def bundle_ref(bundle: str, bundle_url: str | None, target: str) -> BundleRef:
    """Name and digest come from the bundle's manifest; the URL is where nodes pull it from.

    A K3s node cannot read a path on this machine, so ``--target k3s`` needs ``--bundle-url``
    (where the bundle is published); ``--target local`` uses the directory itself.
    """
    try:
        b = open_bundle(bundle, verify=False)
    except AgentError as exc:
        raise RenderError(f"cannot deploy {bundle}: {exc}") from exc
    if bundle_url:
        url = bundle_url
    elif target == "local":
        url = Path(b.path).resolve().as_uri()
    else:
        raise ClusterError(
            f"the bundle {b.path} is on this machine and not reachable from the cluster: "
            "publish it where the nodes can fetch it (an http(s) URL) and pass --bundle-url"
        )
    return BundleRef(name=b.name, digest=b.digest, url=url)
