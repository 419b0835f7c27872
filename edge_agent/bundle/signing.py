"""Bundle signatures: who made a bundle, checked against the keys an operator trusts.

A bundle's digest proves *what* it is; a signature says *who* vouches for it. The format
(``edgegen.signatures/v1``, written down in the README):

- Signatures live in ``edgegen.sig`` beside ``edgegen.json``. That file is never listed in the
  manifest's ``files``, so signing a bundle (or adding a second signature) does not change
  its digest; ``verify_files`` accepts it and no other unlisted file.
- ``edgegen.sig`` is JSON: ``{"format": "edgegen.signatures/v1", "signatures": [...]}``, one
  entry per key: ``algorithm`` (``ed25519``), ``key_id``, ``public_key`` (the raw 32-byte key,
  base64), ``digest`` (the manifest digest it signs, hex) and ``signature`` (64 bytes, base64).
- What is signed is the ASCII message ``edgegen.signatures/v1:<digest>``: the digest is the
  sha256 of the canonical manifest, which holds every file's sha256 and size, so one
  signature covers the whole directory. The prefix keeps the signature from meaning anything
  outside edgegen.
- A key id is the first 16 hex digits of the sha256 of the raw 32-byte public key.
- Keys are PEM: the private key PKCS#8 (file mode 0600), the public key SubjectPublicKeyInfo,
  the same files ``openssl genpkey -algorithm ed25519`` / ``openssl pkey -pubout`` write.

A :class:`TrustPolicy` holds the trusted public keys. A bundle passes when at least one of
its signatures is by a trusted key and verifies over this bundle's digest; other signatures
are ignored. Without a policy nothing here is consulted (the agent logs that once).

This module is the only importer of ``cryptography``; its errors become
``BundleSignatureError`` or ``SigningKeyError`` (``edge_agent/errors.py``) here.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from edge_agent.bundle.format import SIGNATURES_NAME, Bundle, open_bundle
from edge_agent.errors import BundleSignatureError, SigningKeyError

SIGNATURE_FORMAT = "edgegen.signatures/v1"
ALGORITHM = "ed25519"
PUBLIC_KEY_SUFFIX = ".pub"


@dataclass(frozen=True)
class BundleSignature:
    """One entry of ``edgegen.sig``."""

    key_id: str
    public_key: bytes   # raw 32 bytes
    digest: str         # the manifest digest this signature is over
    signature: bytes    # raw 64 bytes
    algorithm: str = ALGORITHM

    def as_json(self) -> dict:
        return {"algorithm": self.algorithm, "key_id": self.key_id,
                "public_key": base64.b64encode(self.public_key).decode(),
                "digest": self.digest, "signature": base64.b64encode(self.signature).decode()}

    def valid_for(self, digest: str, key: Ed25519PublicKey | None = None) -> bool:
        """True when this is an Ed25519 signature over ``digest`` by ``key`` (default: the
        public key it carries; a trust decision must pass the trusted key)."""
        if self.algorithm != ALGORITHM or self.digest != digest:
            return False
        try:
            (key or Ed25519PublicKey.from_public_bytes(self.public_key)).verify(
                self.signature, signed_message(digest))
        except (InvalidSignature, ValueError):
            return False
        return True

    def self_consistent(self, digest: str) -> bool:
        """Verifies over ``digest`` with the key it carries, under that key's id (says nothing
        about who that key belongs to)."""
        return self.key_id == key_id(self.public_key) and self.valid_for(digest)


def signed_message(digest: str) -> bytes:
    """The bytes a signature is over: ``edgegen.signatures/v1:<manifest digest hex>``."""
    return f"{SIGNATURE_FORMAT}:{digest}".encode("ascii")


def key_id(public_key: Ed25519PublicKey | bytes) -> str:
    """16 hex digits of the sha256 of the raw public key."""
    raw = public_key if isinstance(public_key, bytes) else _raw(public_key)
    return hashlib.sha256(raw).hexdigest()[:16]


def _raw(public_key: Ed25519PublicKey) -> bytes:
    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


# -- keys ---------------------------------------------------------------------------------------

def generate_keypair(private_path: str | os.PathLike,
                     public_path: str | os.PathLike | None = None) -> tuple[Path, Path, str]:
    """Write a new Ed25519 key pair: the private key with mode 0600 (never overwriting a file),
    the public key beside it (default: the private key's path with a ``.pub`` suffix).
    Returns (private path, public path, key id)."""
    private_path = Path(private_path)
    public_path = Path(public_path) if public_path else default_public_path(private_path)
    if private_path.resolve() == public_path.resolve():
        raise SigningKeyError(f"the public key would overwrite the private key {private_path}")
    for p in (private_path, public_path):
        if p.exists():
            raise SigningKeyError(f"{p} already exists; refusing to overwrite a key")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    try:
        fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o600)  # whatever the umask
            f.write(pem)
        public_path.write_bytes(public_pem(key.public_key()))
    except OSError as exc:
        raise SigningKeyError(f"cannot write the key pair: {exc}") from exc
    return private_path, public_path, key_id(key.public_key())


def default_public_path(private_path: Path) -> Path:
    return private_path.with_suffix(PUBLIC_KEY_SUFFIX) if private_path.suffix != PUBLIC_KEY_SUFFIX \
        else private_path.with_name(private_path.name + PUBLIC_KEY_SUFFIX)


def public_pem(public_key: Ed25519PublicKey) -> bytes:
    return public_key.public_bytes(serialization.Encoding.PEM,
                                   serialization.PublicFormat.SubjectPublicKeyInfo)


def load_private_key(path: str | os.PathLike) -> Ed25519PrivateKey:
    """An Ed25519 private key from a PEM file (unencrypted PKCS#8, as ``keygen`` writes)."""
    data = _read_key_file(path, "private")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise SigningKeyError(f"{path} is not an unencrypted PEM private key: {exc}") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise SigningKeyError(f"{path} is a {type(key).__name__}; bundles are signed with "
                              "Ed25519 keys (edgegen bundle keygen)")
    return key


def load_public_key(path: str | os.PathLike) -> Ed25519PublicKey:
    """An Ed25519 public key from a PEM file (SubjectPublicKeyInfo, as ``keygen`` writes)."""
    data = _read_key_file(path, "public")
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise SigningKeyError(f"{path} is not a PEM public key: {exc}") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise SigningKeyError(f"{path} is a {type(key).__name__}; edgegen trusts Ed25519 keys")
    return key


def _read_key_file(path: str | os.PathLike, kind: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise SigningKeyError(f"cannot read the {kind} key {path}: {exc.strerror or exc}") \
            from exc


# -- the signature file -------------------------------------------------------------------------

def parse_signatures(raw: bytes, where: str) -> list[BundleSignature]:
    """The entries of an ``edgegen.sig`` file's bytes; ``where`` names it in errors."""
    try:
        doc = json.loads(raw)
        if not isinstance(doc, dict) or doc.get("format") != SIGNATURE_FORMAT:
            raise ValueError(f"format is not {SIGNATURE_FORMAT!r}")
        out = []
        for e in doc["signatures"]:
            out.append(BundleSignature(
                key_id=str(e["key_id"]),
                public_key=base64.b64decode(e["public_key"], validate=True),
                digest=str(e["digest"]), signature=base64.b64decode(e["signature"], validate=True),
                algorithm=str(e["algorithm"])))
        return out
    except (ValueError, KeyError, TypeError, binascii.Error) as exc:
        raise BundleSignatureError(f"{where} is not a valid {SIGNATURE_FORMAT} file: {exc}") \
            from exc


def read_signatures(root: str | os.PathLike) -> list[BundleSignature]:
    """The signatures beside a bundle's manifest; empty when it is unsigned."""
    path = Path(root) / SIGNATURES_NAME
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise BundleSignatureError(f"cannot read {path}: {exc}") from exc
    return parse_signatures(raw, str(path))


def signatures_json(signatures: Iterable[BundleSignature]) -> bytes:
    return json.dumps({"format": SIGNATURE_FORMAT,
                       "signatures": [s.as_json() for s in signatures]},
                      indent=2, sort_keys=True).encode() + b"\n"


def merge_signatures(root: str | os.PathLike,
                     new: Iterable[BundleSignature]) -> list[BundleSignature]:
    """Add ``new`` to the bundle's ``edgegen.sig`` (one entry per key id: a new signature by
    the same key replaces the old), written atomically. Returns the file's entries."""
    root = Path(root)
    merged = {s.key_id: s for s in read_signatures(root)}
    before = dict(merged)
    merged.update((s.key_id, s) for s in new)
    entries = sorted(merged.values(), key=lambda s: s.key_id)
    if merged != before or not (root / SIGNATURES_NAME).exists():
        _write_atomic(root / SIGNATURES_NAME, signatures_json(entries))
    return entries


def _write_atomic(path: Path, data: bytes) -> None:
    # The temporary file is made beside the bundle directory, not inside it, so a reader that
    # verifies the directory meanwhile never sees an unlisted file; the rename is atomic.
    fd, tmp = tempfile.mkstemp(prefix=f".{path.parent.name}-sig-", dir=path.parent.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def sign_bundle(path: str | os.PathLike, key: Ed25519PrivateKey) -> tuple[Bundle, BundleSignature]:
    """Verify the bundle's files, then add a signature by ``key`` over its digest."""
    bundle = open_bundle(path)  # never vouch for files that do not match the manifest
    public = key.public_key()
    sig = BundleSignature(key_id=key_id(public), public_key=_raw(public), digest=bundle.digest,
                          signature=key.sign(signed_message(bundle.digest)))
    try:
        merge_signatures(bundle.path, [sig])
    except OSError as exc:
        raise BundleSignatureError(f"cannot write {bundle.path / SIGNATURES_NAME}: {exc}") \
            from exc
    return bundle, sig


# -- trust --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TrustPolicy:
    """The public keys whose signature makes a bundle acceptable (key id -> key)."""

    keys: dict[str, Ed25519PublicKey]

    @property
    def key_ids(self) -> tuple[str, ...]:
        return tuple(sorted(self.keys))

    def check(self, digest: str, signatures: list[BundleSignature], name: str = "") -> str:
        """The id of a trusted key whose signature over ``digest`` verifies; otherwise
        :class:`BundleSignatureError`, one line naming the digest and the key ids seen."""
        what = f"bundle {name + ' ' if name else ''}{digest[:12]}"
        seen = tuple(dict.fromkeys(s.key_id for s in signatures))
        for s in signatures:
            if s.key_id in self.keys and s.valid_for(digest, self.keys[s.key_id]):
                return s.key_id
        trusted = ", ".join(self.key_ids)
        if not signatures:
            msg = f"{what} is not signed; trusted keys: {trusted}"
        elif any(s.key_id in self.keys for s in signatures):
            bad = ", ".join(s.key_id for s in signatures if s.key_id in self.keys)
            msg = (f"{what}: the signature by trusted key {bad} does not verify over this "
                   f"manifest (changed after signing, or forged); keys seen: {', '.join(seen)}")
        else:
            msg = (f"{what} is signed only by untrusted keys {', '.join(seen)}; "
                   f"trusted keys: {trusted}")
        raise BundleSignatureError(msg + ": refused", digest=digest, seen=seen)

    def check_bundle(self, bundle: Bundle) -> str:
        return self.check(bundle.digest, read_signatures(bundle.path), bundle.name)


def load_trust(paths: Iterable[str | os.PathLike] | None) -> TrustPolicy | None:
    """The policy for the given public key files or directories (every ``*.pub`` inside);
    ``None`` when no path is given (bundles are then not signature-checked)."""
    paths = [Path(p) for p in (paths or ())]
    if not paths:
        return None
    keys: dict[str, Ed25519PublicKey] = {}
    for p in paths:
        if p.is_dir():
            files = sorted(f for f in p.glob(f"*{PUBLIC_KEY_SUFFIX}")
                           if not f.name.startswith(".") and f.is_file())
            if not files:
                raise SigningKeyError(f"trusted key directory {p} holds no *{PUBLIC_KEY_SUFFIX} "
                                      "files")
        else:
            files = [p]
        for f in files:
            k = load_public_key(f)
            keys[key_id(k)] = k
    return TrustPolicy(keys)


def signature_status(bundle: Bundle, trust: TrustPolicy | None) -> str:
    """What ``edgegen bundle verify`` says about a verified bundle's signatures, one phrase.

    With ``trust``: the trusted key that vouches for it, else :class:`BundleSignatureError`.
    Without: every signature must at least verify with the key it carries (a manifest changed
    after signing is refused even so); which keys signed is reported, not judged."""
    if trust is not None:
        return f"signed by trusted key {trust.check_bundle(bundle)}"
    signatures = read_signatures(bundle.path)
    if not signatures:
        return "unsigned"
    bad = [s.key_id for s in signatures if not s.self_consistent(bundle.digest)]
    if bad:
        raise BundleSignatureError(
            f"bundle {bundle.name} {bundle.digest12}: the signature by key {', '.join(bad)} "
            "does not verify over this manifest (changed after signing, or forged): refused",
            digest=bundle.digest, seen=tuple(s.key_id for s in signatures))
    return (f"signed by {', '.join(s.key_id for s in signatures)}, not checked against "
            "trusted keys (give --trust)")


def open_trusted(path: str | os.PathLike, trust: TrustPolicy | None) -> Bundle:
    """:func:`open_bundle` (files verified), then the trust policy when there is one."""
    bundle = open_bundle(path)
    if trust is not None:
        trust.check_bundle(bundle)
    return bundle
