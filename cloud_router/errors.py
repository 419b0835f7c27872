"""Errors raised by the cloud router and the embedded registry.

    RouterError
    ├── RegistryError           the Consul (or embedded registry) API failed or answered badly
    ├── RegistryRequestError    the embedded registry refuses a client's request
    │   ├── InvalidRequest      a body or parameter Consul would answer with 400
    │   ├── NotFound            an unknown check or service ID (404)
    │   ├── ValueTooLarge       a KV value over Consul's 512 KiB limit (413)
    │   ├── AclNotFound         an unknown ACL token (403 "ACL not found")
    │   └── PermissionDenied    the token lacks a permission (403, Consul's text)
    └── ConfigError             router configuration that cannot work (bad API-key file, ...)

Per-request outcomes (no endpoint, upstream failed) are OpenAI-shaped error responses, not
exceptions of this tree.
"""

from __future__ import annotations


class RouterError(Exception):
    """Base of every error the router raises on purpose."""


class RegistryError(RouterError):
    """The service registry could not be read or written."""


class RegistryRequestError(RouterError):
    """The embedded registry refuses a request; the HTTP layer maps it to Consul's status."""

    status_code = 400


class InvalidRequest(RegistryRequestError):
    """A request body or parameter Consul would refuse with 400 and a plain-text message."""


class NotFound(RegistryRequestError):
    """An unknown check or service ID."""

    status_code = 404


class ValueTooLarge(RegistryRequestError):
    """A KV value larger than Consul's ``kv_max_value_size`` (512 KiB): 413, Consul's text."""

    status_code = 413


class ConfigError(RouterError):
    """The router's configuration cannot work."""


class AclNotFound(RegistryRequestError):
    """The request's token is not one the registry knows (Consul: 403 ``ACL not found``)."""

    status_code = 403

    def __init__(self):
        super().__init__("ACL not found")


class PermissionDenied(RegistryRequestError):
    """The token lacks a permission; the message is Consul's PermissionDeniedError text."""

    status_code = 403

    def __init__(self, message: str, accessor: str, permission: str, resource: str):
        super().__init__(message)
        self.accessor, self.permission, self.resource = accessor, permission, resource
