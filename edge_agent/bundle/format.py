"""The bundle: a content-addressed, immutable directory that export writes and agents serve.

Layout (see DESIGN.md)::

    <store>/<name>/<digest12>/
      edgegen.json            the manifest
      model.onnx [+ model.onnx.data]
      tokenizer.json tokenizer_config.json chat_template.jinja config.json generation_config.json
      genai_config.json       (bundles whose runtime is onnxruntime-genai)
      model.last_logits.onnx  (genai CPU bundles) the same graph and weights file, logits of
                              the last position only: what the agent's CPU engine runs
      edgegen.sig             signatures over the digest (signed bundles; not in ``files``)

The digest is the sha256 of the manifest in canonical JSON (sorted keys, no spaces). The
manifest lists every other file with its sha256 and size, so verifying the files and hashing
the manifest together prove the whole directory.

This module is imported by the agent (which must stay free of torch) and by the exporters
(which write bundles), so it uses the standard library only.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from edge_agent.errors import (
    BundleFormatError,
    BundleIntegrityError,
    BundleNotFound,
)

BUNDLE_FORMAT = "edgegen.bundle/v1"
MANIFEST_NAME = "edgegen.json"
# Signatures over the manifest digest (edge_agent.bundle.signing): beside the manifest, never
# listed in its ``files``, so signing does not change the digest.
SIGNATURES_NAME = "edgegen.sig"
# A genai bundle's decoder with the lm_head applied to the last position only (a prompt needs
# one row of logits, not [tokens, vocab]); it reads the same model.onnx.data.
LAST_LOGITS_GRAPH = "model.last_logits.onnx"
TASKS = ("text-generation", "feature-extraction")
PRECISIONS = ("fp32", "fp16", "int8", "int4")
RUNTIMES = ("onnxruntime-genai", "onnxruntime")
REQUIRED_FIELDS = (
    "format", "name", "task", "runtime", "exporter", "source", "precision", "signature",
    "context_length", "files", "validation", "created", "edgegen_version",
)
_CHUNK = 1 << 20


def canonical_json(obj: Any) -> bytes:
    """The one serialisation the digest is taken over: sorted keys, no spaces, UTF-8."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def manifest_digest(manifest: dict) -> str:
    """sha256 hex of the manifest's canonical JSON."""
    return hashlib.sha256(canonical_json(manifest)).hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def default_store() -> Path:
    """Where bundles live unless told otherwise: $EDGEGEN_STORE or ~/.cache/edgegen/bundles."""
    env = os.environ.get("EDGEGEN_STORE")
    return Path(env) if env else Path.home() / ".cache" / "edgegen" / "bundles"


@dataclass(frozen=True)
class Bundle:
    """A bundle on disk whose manifest has been read (and, by default, verified)."""

    path: Path
    manifest: dict
    digest: str

    @property
    def name(self) -> str:
        return self.manifest["name"]

    @property
    def digest12(self) -> str:
        return self.digest[:12]

    @property
    def task(self) -> str:
        return self.manifest["task"]

    @property
    def runtime(self) -> str:
        return self.manifest["runtime"]

    @property
    def precision(self) -> str:
        return self.manifest["precision"]

    @property
    def context_length(self) -> int:
        return int(self.manifest["context_length"])

    def file(self, relpath: str) -> Path:
        return self.path / relpath

    def has_file(self, relpath: str) -> bool:
        return relpath in self.manifest["files"]


def read_manifest(path: str | os.PathLike) -> tuple[dict, str]:
    """Parse and shape-check ``edgegen.json``; return it with its digest. No file hashing."""
    root = Path(path)
    mpath = root / MANIFEST_NAME
    if not root.exists():
        raise BundleNotFound(f"no bundle at {root}: the path does not exist")
    if not mpath.is_file():
        raise BundleNotFound(f"no bundle at {root}: {MANIFEST_NAME} is missing")
    try:
        manifest = json.loads(mpath.read_bytes())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleFormatError(f"{mpath} is not valid JSON: {exc}") from exc
    if not isinstance(manifest, dict):
        raise BundleFormatError(f"{mpath} must hold a JSON object")
    if manifest.get("format") != BUNDLE_FORMAT:
        raise BundleFormatError(
            f"{mpath} has format {manifest.get('format')!r}; this edgegen reads {BUNDLE_FORMAT!r}"
        )
    missing = [f for f in REQUIRED_FIELDS if f not in manifest]
    if missing:
        raise BundleFormatError(f"{mpath} lacks required fields: {', '.join(missing)}")
    for field, allowed in (("task", TASKS), ("precision", PRECISIONS), ("runtime", RUNTIMES)):
        if manifest[field] not in allowed:
            raise BundleFormatError(
                f"{mpath}: {field} {manifest[field]!r} is not one of {', '.join(allowed)}"
            )
    files = manifest["files"]
    if not isinstance(files, dict) or not files:
        raise BundleFormatError(f"{mpath}: 'files' must map each file to its sha256 and size")
    for rel, entry in files.items():
        if not _is_safe_relpath(rel):
            raise BundleFormatError(f"{mpath}: file path {rel!r} escapes the bundle")
        if rel == SIGNATURES_NAME:
            raise BundleFormatError(f"{mpath}: {SIGNATURES_NAME} holds signatures and cannot "
                                    "be listed in 'files'")
        if not isinstance(entry, dict) or "sha256" not in entry or "size" not in entry:
            raise BundleFormatError(f"{mpath}: files[{rel!r}] needs sha256 and size")
    return manifest, manifest_digest(manifest)


def verify_files(root: Path, manifest: dict) -> list[str]:
    """Every problem with the bundle's files, one line each; empty when all match."""
    problems: list[str] = []
    for rel, entry in sorted(manifest["files"].items()):
        fpath = root / rel
        if not fpath.is_file():
            problems.append(f"{rel}: missing")
            continue
        size = fpath.stat().st_size
        if size != entry["size"]:
            problems.append(f"{rel}: size {size} != {entry['size']} in manifest")
            continue
        if sha256_file(fpath) != entry["sha256"]:
            problems.append(f"{rel}: sha256 mismatch")
    listed = set(manifest["files"]) | {MANIFEST_NAME, SIGNATURES_NAME}
    for fpath in sorted(root.rglob("*")):
        rel = fpath.relative_to(root).as_posix()
        if fpath.is_file() and rel not in listed:
            problems.append(f"{rel}: not listed in the manifest")
    return problems


def open_bundle(path: str | os.PathLike, *, verify: bool = True) -> Bundle:
    """Read a bundle; with ``verify`` (the default) refuse it unless every file matches."""
    root = Path(path).resolve()
    manifest, digest = read_manifest(root)
    if verify:
        problems = verify_files(root, manifest)
        if problems:
            raise BundleIntegrityError(str(root), problems)
    return Bundle(path=root, manifest=manifest, digest=digest)


def iter_bundles(store: str | os.PathLike) -> Iterator[Bundle]:
    """Bundles in a store (``<store>/<name>/<digest12>/``), unverified, newest first per name."""
    root = Path(store)
    if not root.is_dir():
        return
    found = []
    for mpath in root.glob(f"*/*/{MANIFEST_NAME}"):
        try:
            found.append(open_bundle(mpath.parent, verify=False))
        except (BundleFormatError, BundleNotFound):
            continue
    found.sort(key=lambda b: (b.name, b.manifest.get("created", "")), reverse=True)
    yield from found


def find_in_store(store: str | os.PathLike, digest: str) -> Bundle | None:
    """The bundle in ``store`` whose digest starts with ``digest`` (12+ hex chars), verified."""
    for b in iter_bundles(store):
        if b.digest.startswith(digest) or digest.startswith(b.digest12):
            return open_bundle(b.path)
    return None


def file_entries(root: Path) -> dict[str, dict]:
    """sha256 and size of every file under ``root`` except the manifest and signatures."""
    entries = {}
    for fpath in sorted(root.rglob("*")):
        rel = fpath.relative_to(root).as_posix()
        if fpath.is_file() and rel not in (MANIFEST_NAME, SIGNATURES_NAME):
            entries[rel] = {"sha256": sha256_file(fpath), "size": fpath.stat().st_size}
    return entries


def write_bundle(staging: str | os.PathLike, manifest: dict, store: str | os.PathLike, *,
                 seal: Callable[[Path], object] | None = None) -> Bundle:
    """Seal a staged directory into the store, atomically.

    ``staging`` holds the bundle's files; ``manifest`` holds every field except ``files``,
    ``format``, ``created`` and ``edgegen_version``, which are filled in here. The directory
    is renamed into ``<store>/<name>/<digest12>`` in one step, so a reader never sees half a
    bundle and an interrupted export leaves nothing behind in the store. Writing a bundle
    whose digest already exists returns the existing one. ``seal`` (e.g. signing) is called
    with the bundle's directory once its manifest is written: the staged one before the
    rename, so the bundle appears in the store already signed, or the existing one.
    """
    from edge_agent.version import VERSION

    staging = Path(staging)
    full = dict(manifest)
    full["format"] = BUNDLE_FORMAT
    full.setdefault("created", _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    full.setdefault("edgegen_version", VERSION)
    full["files"] = file_entries(staging)
    missing = [f for f in REQUIRED_FIELDS if f not in full]
    if missing:
        raise ValueError(f"manifest lacks {missing}")
    (staging / MANIFEST_NAME).write_bytes(json.dumps(full, indent=2, sort_keys=True).encode())
    digest = manifest_digest(full)
    dest = Path(store) / full["name"] / digest[:12]
    if dest.exists():
        shutil.rmtree(staging, ignore_errors=True)
        if seal is not None:
            seal(dest)
        return open_bundle(dest)
    if seal is not None:
        seal(staging)
    dest.parent.mkdir(parents=True, exist_ok=True)
    os.replace(staging, dest)
    return Bundle(path=dest.resolve(), manifest=full, digest=digest)


def staging_dir(store: str | os.PathLike) -> Path:
    """A fresh temporary directory on the store's filesystem, so the final rename is atomic.

    Its name carries the writer's pid; staging directories left by writers that died (an
    export killed mid-way) are removed here, so they do not pile up in the store.
    """
    root = Path(store)
    root.mkdir(parents=True, exist_ok=True)
    for old in root.glob(".staging-*"):
        pid = old.name.split("-")[1]
        if pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f".staging-{os.getpid()}-", dir=root))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _is_safe_relpath(rel: str) -> bool:
    p = Path(rel)
    return not p.is_absolute() and ".." not in p.parts and rel == p.as_posix()
