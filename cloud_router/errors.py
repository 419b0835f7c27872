"""Errors raised by the cloud router and the embedded registry.

    RouterError
    ├── RegistryError           the Consul (or embedded registry) API failed or answered badly
    └── ConfigError             router configuration that cannot work (bad API-key file, ...)

Per-request outcomes (no endpoint, upstream failed) are OpenAI-shaped error responses, not
exceptions of this tree.
"""

from __future__ import annotations


class RouterError(Exception):
    """Base of every error the router raises on purpose."""


class RegistryError(RouterError):
    """The service registry could not be read or written."""


class ConfigError(RouterError):
    """The router's configuration cannot work."""
