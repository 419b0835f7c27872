"""Errors raised by the edge agent.

    AgentError
    ├── BundleError                 a bundle cannot be used
    │   ├── BundleNotFound          no bundle (or no edgegen.json) at the path
    │   ├── BundleFormatError       edgegen.json is unreadable or not edgegen.bundle/v1
    │   ├── BundleIntegrityError    files do not match the manifest (tampered, truncated, missing)
    │   └── BundleFetchError        a bundle URL could not be downloaded or verified
    └── DeviceUnavailable           a GPU execution provider was asked for but is not present

Request-level problems (bad parameters, prompt too long, queue full) are not exceptions of
this tree: they are OpenAI-shaped error values built in ``protocol``.
"""

from __future__ import annotations


class AgentError(Exception):
    """Base of every error the edge agent raises on purpose."""


class BundleError(AgentError):
    """A bundle cannot be used."""


class BundleNotFound(BundleError):
    """No bundle at the given path."""


class BundleFormatError(BundleError):
    """The manifest is unreadable, or not in a format this agent understands."""


class BundleIntegrityError(BundleError):
    """The bundle's files do not match the sha256 and sizes in its manifest."""

    def __init__(self, path: str, problems: list[str]):
        self.path = path
        self.problems = problems
        super().__init__(f"bundle {path} failed verification: " + "; ".join(problems))


class BundleFetchError(BundleError):
    """A bundle URL could not be downloaded, or what arrived does not verify."""


class DeviceUnavailable(AgentError):
    """The requested device (CUDA, TensorRT) has no execution provider on this machine."""
