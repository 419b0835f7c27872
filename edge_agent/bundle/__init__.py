"""The bundle: the contract between export and serving.

- ``format``   the on-disk format: manifest, digest, verification, the content-addressed store
- ``fetch``    download a bundle URL into the store (resumable, sha256-verified)
- ``publish``  serve a store over HTTP for ``fetch`` (``edgegen bundle serve``)
- ``signing``  Ed25519 signatures over the digest (``edgegen.sig``) and the trust policy

The format's names are re-exported here, so ``from edge_agent.bundle import Bundle`` reads
as what it is; ``fetch``, ``publish`` and ``signing`` are imported by name (they pull in
httpx, FastAPI, cryptography).
"""

from edge_agent.bundle.format import (
    BUNDLE_FORMAT,
    MANIFEST_NAME,
    PRECISIONS,
    REQUIRED_FIELDS,
    RUNTIMES,
    SIGNATURES_NAME,
    TASKS,
    Bundle,
    canonical_json,
    default_store,
    file_entries,
    find_in_store,
    iter_bundles,
    manifest_digest,
    open_bundle,
    read_manifest,
    sha256_file,
    staging_dir,
    verify_files,
    write_bundle,
)

__all__ = [
    "BUNDLE_FORMAT", "MANIFEST_NAME", "PRECISIONS", "REQUIRED_FIELDS", "RUNTIMES", "SIGNATURES_NAME", "TASKS",
    "Bundle", "canonical_json", "default_store", "file_entries", "find_in_store",
    "iter_bundles", "manifest_digest", "open_bundle", "read_manifest", "sha256_file",
    "staging_dir", "verify_files", "write_bundle",
]
