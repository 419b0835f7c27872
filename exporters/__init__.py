"""Export models to validated, quantized ONNX bundles. Imports torch lazily, inside functions.

The entry point is :func:`exporters.pipeline.export_model`. This ``__init__`` imports nothing,
so that reading one module of the package (``exporters.sources``, say) does not load the
whole pipeline, and no module here imports its own package back.
"""
