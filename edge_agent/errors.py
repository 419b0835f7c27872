"""Errors raised by the edge agent.

    AgentError
    ├── BundleError                 a bundle cannot be used
    │   ├── BundleNotFound          no bundle (or no edgegen.json) at the path
    │   ├── BundleFormatError       edgegen.json is unreadable or not edgegen.bundle/v1
    │   ├── BundleIntegrityError    files do not match the manifest (tampered, truncated, missing)
    │   ├── BundleFetchError        a bundle URL could not be downloaded or verified
    │   ├── BundleSignatureError    no valid signature by a trusted key (a trust policy is set)
    │   └── ModelLoadError          the bundle verified, but its runtime cannot load the model
    ├── SigningKeyError             a signing or public key file cannot be read or written
    ├── DeviceUnavailable           a GPU execution provider was asked for but is not present
    ├── GenerationError             the runtime failed while generating (not the client's fault)
    └── RegistrationError           Consul refused or could not be reached (registration retries)

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


class BundleSignatureError(BundleError):
    """The bundle carries no valid signature by a trusted key (or its signatures are malformed).

    ``digest`` is the bundle's manifest digest; ``seen`` the key ids of its signatures.
    """

    def __init__(self, message: str, digest: str = "", seen: tuple[str, ...] = ()):
        self.digest = digest
        self.seen = seen
        super().__init__(message)


class SigningKeyError(AgentError):
    """A private or public key file cannot be read or written, or is not an Ed25519 key."""


class DeviceUnavailable(AgentError):
    """The requested device (CUDA, TensorRT) has no execution provider on this machine."""


class ModelLoadError(BundleError):
    """The bundle's files verify, but onnxruntime / onnxruntime-genai refuses to load them."""


class GenerationError(AgentError):
    """The runtime raised while prefilling or decoding; the request gets a 500, others go on."""


class MqttError(AgentError):
    """The MQTT bridge or the device client cannot do its job."""


class MqttConfigError(MqttError):
    """A broker URL, CA file or option that cannot work."""


class MqttConnectError(MqttError):
    """The broker cannot be reached, or refused the connection (the reason is in the text)."""


class MqttTimeout(MqttError):
    """A device request got no (further) reply in time."""


class MqttReplyError(MqttError):
    """The agent answered with an OpenAI-shaped error; ``error`` holds its ``error`` object."""

    def __init__(self, error: dict):
        self.error = error
        super().__init__(f"{error.get('type', 'error')}: {error.get('message', error)}")


class RegistrationError(AgentError):
    """The Consul agent API refused a registration call or could not be reached."""
