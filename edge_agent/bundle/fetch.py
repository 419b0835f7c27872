"""Bundle URLs → the content-addressed store: resumable, sha256-verified, offline-capable.

A bundle URL is the HTTP address of a bundle directory (``edgegen bundle serve`` publishes
a store as ``http://host:port/<name>/<digest12>/``). Fetching reads ``edgegen.json``, then
downloads each listed file into ``<store>/.partial/<digest>/``, resuming a partial file with
an HTTP Range request, checks every sha256 against the manifest, and renames the finished
directory to ``<store>/<name>/<digest12>/`` in one step. A URL that names a digest already
in the store is served from the store without touching the network; a URL that cannot be
reached falls back to the bundle last fetched from it (offline autonomy).

Signatures (``edgegen.sig``, when the server has one) come along with the bundle. Given a
trust policy, they are checked against the manifest's digest right after the manifest is
read, before any file is downloaded: a bundle no trusted key signed is refused and leaves
nothing in the store; a cached bundle is held to the same policy.

This module owns the HTTP side of bundles: httpx errors become BundleFetchError here.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import httpx

from edge_agent.bundle.format import (
    MANIFEST_NAME,
    SIGNATURES_NAME,
    Bundle,
    _is_safe_relpath,
    find_in_store,
    manifest_digest,
    open_bundle,
    read_manifest,
    sha256_file,
)
from edge_agent.bundle.signing import (
    BundleSignatureError,
    TrustPolicy,
    merge_signatures,
    open_trusted,
    parse_signatures,
)
from edge_agent.errors import BundleError, BundleFetchError, BundleFormatError

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]  # (file, bytes done, bytes total)
_DIGEST_IN_URL = re.compile(r"/([0-9a-f]{12,64})/?$")


def is_url(source: str) -> bool:
    return source.startswith(("http://", "https://"))


def resolve_bundle(source: str, store: str | os.PathLike, *, progress: Progress | None = None,
                   timeout: float = 30.0, trust: TrustPolicy | None = None) -> Bundle:
    """A verified bundle for ``source``: a directory path, or a URL fetched into ``store``;
    with ``trust``, also signed by one of its keys (else :class:`BundleSignatureError`)."""
    if not is_url(source):
        return open_trusted(source, trust)
    return fetch_bundle(source, store, progress=progress, timeout=timeout, trust=trust)


def fetch_bundle(url: str, store: str | os.PathLike, *, progress: Progress | None = None,
                 timeout: float = 30.0, trust: TrustPolicy | None = None) -> Bundle:
    store = Path(store)
    base = url.rstrip("/") + "/"
    named = _DIGEST_IN_URL.search(url.rstrip("/") + "/")
    untrusted = None  # cached but not (yet) signed by a trusted key: the server may have it
    if named:
        cached = find_in_store(store, named.group(1))
        if cached is not None and _trusted(cached, trust):
            log.info("bundle found in the store", extra={"url": url, "digest": cached.digest12})
            return cached
        untrusted = cached
    try:
        with httpx.Client(timeout=timeout, follow_redirects=True) as client:
            bundle = _download(client, base, store, named.group(1) if named else None, progress,
                               trust)
    except httpx.TransportError as exc:
        cached = _last_fetched(store, url) or untrusted
        if cached is not None:
            if trust is not None:
                trust.check_bundle(cached)
            log.warning("bundle URL unreachable; serving the cached bundle",
                        extra={"url": url, "digest": cached.digest12, "error": str(exc)})
            return cached
        raise BundleFetchError(f"cannot reach {url}: {exc} (and no cached copy in {store})") from exc
    except httpx.HTTPStatusError as exc:
        raise BundleFetchError(f"{exc.request.url} answered {exc.response.status_code}") from exc
    _remember(store, url, bundle)
    return bundle


def _trusted(bundle: Bundle, trust: TrustPolicy | None) -> bool:
    if trust is None:
        return True
    try:
        trust.check_bundle(bundle)
    except BundleSignatureError:
        return False
    return True


def _download(client: httpx.Client, base: str, store: Path, expected: str | None,
              progress: Progress | None, trust: TrustPolicy | None) -> Bundle:
    resp = client.get(base + MANIFEST_NAME)
    resp.raise_for_status()
    raw = resp.content
    try:
        manifest = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleFormatError(f"{base}{MANIFEST_NAME} is not JSON: {exc}") from exc
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise BundleFormatError(f"{base}{MANIFEST_NAME} is not a bundle manifest")
    digest = manifest_digest(manifest)
    if expected and not digest.startswith(expected):
        raise BundleFetchError(
            f"{base} names digest {expected} but its manifest hashes to {digest[:12]}: refused")
    sig_raw = _signature_file(client, base)
    try:
        signatures = parse_signatures(sig_raw, base + SIGNATURES_NAME) if sig_raw else []
    except BundleSignatureError:
        if trust is not None:
            raise
        signatures = []  # kept as it came: only a trust policy reads it
    if trust is not None:  # before anything is written: a refused bundle leaves no trace
        trust.check(digest, signatures, str(manifest.get("name", "")))
    dest = store / str(manifest.get("name", "")) / digest[:12]
    if (dest / MANIFEST_NAME).is_file():
        if signatures:  # signed since it was cached: signatures do not change the digest
            merge_signatures(dest, [s for s in signatures if s.digest == digest])
        return open_trusted(dest, trust)
    partial = store / ".partial" / digest
    partial.mkdir(parents=True, exist_ok=True)
    (partial / MANIFEST_NAME).write_bytes(raw)
    if sig_raw is not None:
        (partial / SIGNATURES_NAME).write_bytes(sig_raw)
    else:
        (partial / SIGNATURES_NAME).unlink(missing_ok=True)
    read_manifest(partial)  # shape check before downloading gigabytes
    _check_room(manifest, partial)
    for rel, entry in sorted(manifest["files"].items()):
        if not _is_safe_relpath(rel):
            raise BundleFormatError(f"manifest file path {rel!r} escapes the bundle")
        _fetch_file(client, base + rel, partial / rel, entry, progress)
    bundle = open_bundle(partial)  # verifies every file against the manifest
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists():
        shutil.rmtree(partial, ignore_errors=True)
    else:
        os.replace(partial, dest)
    log.info("bundle fetched", extra={"name": bundle.name, "digest": digest[:12]})
    return open_bundle(dest, verify=False) if dest.exists() else bundle


# Room left on the store's disk after a download: a node that fills its disk cannot log,
# journal or swap back.
DISK_MARGIN = 64 * 2**20


def _check_room(manifest: dict, partial: Path) -> None:
    """Refuse before downloading a bundle that would not fit the store's disk (what a partial
    download already holds counts as written)."""
    need = 0
    for rel, entry in manifest["files"].items():
        size = int(entry.get("size", 0)) if isinstance(entry, dict) else 0
        have = partial / rel
        need += max(0, size - (have.stat().st_size if have.is_file() else 0))
    free = shutil.disk_usage(partial).free
    if need + DISK_MARGIN > free:
        raise BundleFetchError(f"the bundle needs {need / 2**20:.0f} MiB more on the store's "
                               f"disk ({partial.parent.parent}), which has {free / 2**20:.0f} "
                               f"MiB free (keeping {DISK_MARGIN // 2**20} MiB)")


def _signature_file(client: httpx.Client, base: str) -> bytes | None:
    """The server's ``edgegen.sig``, or None for an unsigned bundle (any 4xx: object stores
    answer 403 for a missing key)."""
    resp = client.get(base + SIGNATURES_NAME)
    if 400 <= resp.status_code < 500:
        return None
    resp.raise_for_status()
    return resp.content


def _fetch_file(client: httpx.Client, url: str, path: Path, entry: dict,
                progress: Progress | None) -> None:
    size, want = int(entry["size"]), entry["sha256"]
    path.parent.mkdir(parents=True, exist_ok=True)
    have = path.stat().st_size if path.exists() else 0
    if have == size and sha256_file(path) == want:
        return
    if have >= size:  # complete but wrong, or longer than it should be: start over
        path.unlink()
        have = 0
    headers = {"Range": f"bytes={have}-"} if have else {}
    with client.stream("GET", url, headers=headers) as resp:
        if resp.status_code == 200 and have:  # server ignored the Range: start over
            have = 0
        elif resp.status_code not in (200, 206):
            resp.raise_for_status()
        with open(path, "ab" if have else "wb") as f:
            done = have
            for chunk in resp.iter_bytes(1 << 20):
                f.write(chunk)
                done += len(chunk)
                if progress:
                    progress(path.name, done, size)
    if path.stat().st_size != size or sha256_file(path) != want:
        path.unlink(missing_ok=True)
        raise BundleFetchError(f"{url}: downloaded file does not match its sha256 in the manifest")


def _source_record(store: Path, url: str) -> Path:
    key = hashlib.sha256(url.rstrip("/").encode()).hexdigest()[:32]
    return store / ".sources" / f"{key}.json"


def _remember(store: Path, url: str, bundle: Bundle) -> None:
    record = _source_record(store, url)
    record.parent.mkdir(parents=True, exist_ok=True)
    tmp = record.with_suffix(".tmp")
    tmp.write_text(json.dumps({"url": url, "digest": bundle.digest, "path": str(bundle.path)}))
    os.replace(tmp, record)


def _last_fetched(store: Path, url: str) -> Bundle | None:
    record = _source_record(store, url)
    try:
        info = json.loads(record.read_text())
        return open_bundle(info["path"])
    except (OSError, ValueError, KeyError, BundleError):
        return None
