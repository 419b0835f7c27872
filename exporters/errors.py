"""Errors raised while exporting a model to a bundle.

    ExportError
    ├── SourceError             the source cannot be read (missing file, bad GGUF, hub unreachable)
    ├── UnsupportedModel        no exporter path handles the architecture (names the paths tried)
    ├── ExportOptionError       options that contradict the model or machine (context too long,
    │                           fp16/cuda/TensorRT without a GPU)
    ├── ValidationFailed        the ONNX graph does not match the reference model
    ├── QualityGateFailed       a quantized bundle loses more perplexity than allowed
    └── StoreError              the bundle store is not writable

Every message is one line that names the problem; the CLI prints it without a traceback.
"""

from __future__ import annotations


class ExportError(Exception):
    """Base of every error the exporters raise on purpose."""


class SourceError(ExportError):
    """The model source cannot be read."""


class UnsupportedModel(ExportError):
    """No exporter path can handle this model."""


class ExportOptionError(ExportError):
    """The options cannot be honoured for this model or on this machine."""


class ValidationFailed(ExportError):
    """The exported graph disagrees with the reference model."""


class QualityGateFailed(ExportError):
    """A quantized export lost more quality than the gate allows."""


class StoreError(ExportError):
    """The bundle store cannot be written."""
