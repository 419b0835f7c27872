"""Export models to validated, quantized ONNX bundles. Imports torch lazily, inside functions."""
