"""Keep the libraries an export drives from writing to the user's terminal.

transformers, optimum, huggingface_hub and torch print warnings meant for their own
developers (the legacy-tokenizer notice, ``torch_dtype`` deprecation, tracer warnings) and
tqdm bars (dequantizing a GGUF), which land beside `edgegen export`'s own progress. The
libraries read most of these switches from the environment when first imported, and an export
imports them lazily, inside the block; the logger levels cover a library already imported.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

QUIET_ENV = {
    "TRANSFORMERS_VERBOSITY": "error",      # transformers and optimum
    "HF_HUB_VERBOSITY": "error",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TQDM_DISABLE": "1",                    # transformers' GGUF loader calls tqdm directly
}
LIBRARY_LOGGERS = ("transformers", "optimum", "huggingface_hub")


@contextmanager
def quiet_libraries(enabled: bool = True) -> Iterator[None]:
    """Within the block, the libraries log errors only, show no progress bars and no Python
    warnings; everything is restored on exit. ``enabled=False`` (``--debug``) changes nothing."""
    if not enabled:
        yield
        return
    saved_env = {name: os.environ.get(name) for name in QUIET_ENV}
    loggers = [logging.getLogger(name) for name in LIBRARY_LOGGERS]
    saved_levels = [lg.level for lg in loggers]
    os.environ.update(QUIET_ENV)
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        for lg, level in zip(loggers, saved_levels):
            lg.setLevel(level)
