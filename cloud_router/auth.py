"""API keys for the router's OpenAI API (``Authorization: Bearer <key>``)."""

from __future__ import annotations

import hmac
from pathlib import Path

from cloud_router.errors import ConfigError


def load_api_keys(path: str | Path) -> frozenset[str]:
    """One key per line; blank lines and lines starting with ``#`` are ignored."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read the API-key file {path}: {exc.strerror}") from exc
    keys = frozenset(line.strip() for line in text.splitlines()
                     if line.strip() and not line.lstrip().startswith("#"))
    if not keys:
        raise ConfigError(f"the API-key file {path} holds no key")
    return keys


def bearer_key_ok(authorization: str | None, keys: frozenset[str]) -> bool:
    """Whether the header carries one of ``keys`` (constant-time per comparison)."""
    if not authorization:
        return False
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return False
    token = token.strip().encode()
    return any(hmac.compare_digest(token, k.encode()) for k in keys)
