"""Export models to validated, quantized ONNX bundles. Imports torch lazily, inside functions.

The one entry point is :func:`export_model`; see :mod:`exporters.pipeline`.
"""

from exporters.pipeline import export_model

__all__ = ["export_model"]
