"""The one module that imports onnxruntime: execution providers, session options, sessions,
tensor dtypes, and the translation of onnxruntime's exceptions into the agent's own.

onnxruntime raises its own types (``Fail``, ``InvalidGraph``, ``RuntimeException``...) from
``onnxruntime.capi``; they are translated here, once: a session that cannot be created is a
``ModelLoadError``, a run that fails is a ``GenerationError``. Engines call ``open_session``
and run inside ``run_errors()``, and never import onnxruntime themselves.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import onnxruntime as ort

from edge_agent.errors import AgentError, DeviceUnavailable, GenerationError, ModelLoadError

# --device → onnxruntime execution providers, most preferred first.
DEVICE_PROVIDERS = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}

# ONNX tensor type names → numpy dtypes, for the KV caches and logits engines allocate.
NUMPY_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}

InferenceSession = ort.InferenceSession  # for type hints in the engines


def providers_for(device: str) -> list[str]:
    """Execution providers for ``device``; DeviceUnavailable if its GPU provider is absent."""
    if device not in DEVICE_PROVIDERS:
        raise DeviceUnavailable(f"unknown device {device!r}: use one of {', '.join(DEVICE_PROVIDERS)}")
    wanted = DEVICE_PROVIDERS[device]
    available = set(ort.get_available_providers())
    if wanted[0] not in available:
        raise DeviceUnavailable(
            f"--device {device} needs onnxruntime's {wanted[0]}, which this installation lacks "
            f"(available: {', '.join(sorted(available))}); install the 'gpu' extra on a GPU node"
        )
    return [p for p in wanted if p in available]


def session_options(threads: int, *, spinning: bool = True) -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if not spinning:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return so


def open_session(model_path: str, *, providers: list[str], threads: int,
                 spinning: bool = True) -> ort.InferenceSession:
    """An inference session on ``model_path``; ModelLoadError if onnxruntime refuses it, and
    DeviceUnavailable if it did not get the first provider asked for: onnxruntime falls back
    to the CPU when a GPU provider cannot start (no driver, a missing CUDA library), which
    would serve a GPU node's traffic on its CPU without a word."""
    try:
        session = ort.InferenceSession(model_path, sess_options=session_options(
            threads, spinning=spinning), providers=providers)
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
        raise ModelLoadError(f"onnxruntime cannot load {model_path}: {exc}") from exc
    if providers and session.get_providers()[0] != providers[0]:
        raise DeviceUnavailable(
            f"onnxruntime could not start {providers[0]} for {model_path} (the session runs "
            f"on {', '.join(session.get_providers())}): check the GPU driver and the CUDA "
            f"libraries onnxruntime-gpu needs"
        )
    return session


@contextlib.contextmanager
def run_errors() -> Iterator[None]:
    """Wrap a session run: onnxruntime's failures become GenerationError (the agent's own
    errors pass through unchanged)."""
    try:
        yield
    except AgentError:
        raise
    except Exception as exc:  # onnxruntime's own exception types, and numpy's on the feeds
        raise GenerationError(f"onnxruntime: {exc}") from exc
