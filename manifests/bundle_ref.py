"""Which bundle a command deploys: the BUNDLE argument of `edgegen deploy` made into a
`BundleRef` the cluster can pull, and the store's newest bundle for `edgegen up`."""

from __future__ import annotations

import os
from pathlib import Path

from edge_agent.bundle import Bundle, iter_bundles, open_bundle
from edge_agent.errors import AgentError
from manifests.errors import ClusterError, LocalFleetError, RenderError
from manifests.render import BundleRef


def newest_bundle(store: str | os.PathLike) -> Bundle:
    """The bundle of ``store`` exported last, whatever its name (``iter_bundles`` orders by
    name first). Newest by the manifest's ``created``: write_bundle writes it in UTC ISO 8601,
    so the strings sort in time order."""
    newest = max(iter_bundles(store), key=lambda b: b.manifest["created"], default=None)
    if newest is None:
        raise LocalFleetError(
            f"no bundle in {store}: export one first, e.g. "
            "`edgegen export HuggingFaceTB/SmolLM2-135M-Instruct --precision int8`, "
            "or pass --bundle")
    return newest


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
