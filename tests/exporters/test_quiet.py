"""quiet_libraries: what it switches off inside the block, and that it puts everything back.
The whole export, through the CLI, is in tests/cli/test_cli_export.py."""

import gc
import logging
import os
import warnings

from exporters.quiet import LIBRARY_LOGGERS, QUIET_ENV, quiet_libraries


def user_warnings(caught) -> list[str]:
    """What was warned with ``warnings.warn`` here: not the ResourceWarnings the collector may
    issue meanwhile for what earlier tests left unclosed."""
    return [str(w.message) for w in caught if w.category is UserWarning]


def test_quiet_inside_the_block_and_restored_after(monkeypatch):
    gc.collect()
    monkeypatch.setenv("TRANSFORMERS_VERBOSITY", "info")
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    before = {name: logging.getLogger(name).level for name in LIBRARY_LOGGERS}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with quiet_libraries():
            assert {k: os.environ[k] for k in QUIET_ENV} == QUIET_ENV
            assert all(logging.getLogger(n).level == logging.ERROR for n in LIBRARY_LOGGERS)
            warnings.warn("a library's advice", UserWarning)
        warnings.warn("ours, after the block", UserWarning)
    assert user_warnings(caught) == ["ours, after the block"]
    assert os.environ["TRANSFORMERS_VERBOSITY"] == "info" and "TQDM_DISABLE" not in os.environ
    assert {name: logging.getLogger(name).level for name in LIBRARY_LOGGERS} == before


def test_disabled_changes_nothing(monkeypatch):
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with quiet_libraries(enabled=False):
            assert "TQDM_DISABLE" not in os.environ
            warnings.warn("shown with --debug", UserWarning)
    assert user_warnings(caught) == ["shown with --debug"]
