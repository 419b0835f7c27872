"""`edgegen export` through Typer's CliRunner (help, success) and as a real process (errors:
one line, the right exit code, no traceback, nothing written)."""

import json
import os
import subprocess
import sys
import time

import pytest
from typer.testing import CliRunner

from cli.main import app
from tests.exporters.gguf_support import write_tiny_llama_gguf
from tests.support.procs import REPO

runner = CliRunner()


def edgegen(*args, timeout=300, env=None):
    return subprocess.run([sys.executable, "-m", "cli.main", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout, env=env)


def test_help_lists_every_flag():
    r = runner.invoke(app, ["export", "--help"])
    assert r.exit_code == 0
    for flag in ("--name", "--precision", "--task", "--out", "--context-length", "--device",
                 "--exporter", "--trt", "--max-ppl-increase", "--force"):
        assert flag in r.output, flag


def test_help_lists_every_builtin_model():
    from exporters.sources import BUILTIN

    r = runner.invoke(app, ["export", "--help"], terminal_width=400)
    assert r.exit_code == 0
    text = " ".join(r.output.replace("│", " ").split())
    for name in BUILTIN:
        assert f"builtin:{name}" in text, name


def test_cli_default_gate_matches_the_library():
    from cli.export import DEFAULT_MAX_PPL_INCREASE
    from exporters.gate import DEFAULT_MAX_PPL_INCREASE_PCT

    assert DEFAULT_MAX_PPL_INCREASE == DEFAULT_MAX_PPL_INCREASE_PCT


def test_export_tiny_model_prints_the_manifest(tiny_llama_dir, tmp_path):
    r = runner.invoke(app, ["export", str(tiny_llama_dir), "--precision", "fp32",
                            "--exporter", "genai", "--out", str(tmp_path), "--name", "cli-tiny",
                            "--context-length", "512", "--threads", "1", "--json"])
    assert r.exit_code == 0, r.output
    out = r.stdout
    m = json.loads(out[out.index("{"):])
    assert m["name"] == "cli-tiny" and m["context_length"] == 512
    assert m["validation"]["teacher_forced_top1_agreement"] == 1.0
    shown = runner.invoke(app, ["bundle", "inspect", m["path"], "--json"])
    assert json.loads(shown.stdout)["digest"] == m["digest"]


@pytest.mark.parametrize("args, code, message", [
    (["export", "{tmp}/missing.gguf"], 1, "does not exist"),
    (["export", "{tmp}/not.gguf"], 1, "is not a GGUF file"),
    (["export", "{tiny}", "--context-length", "99999"], 1,
     "larger than the model's maximum of 1024"),
    (["export", "{tiny}", "--out", "{tmp}/file/store"], 1, "is not writable"),
    (["export", "{tiny}", "--precision", "fp16"], 1, "fp16 export needs a GPU"),
    (["export", "{tiny}", "--device", "cuda"], 1, "--device cuda needs a GPU"),
    (["export", "{tiny}", "--trt"], 1, "--trt needs TensorRT"),
    (["export", "{tiny}", "--precision", "int3"], 2, "Invalid value for '--precision'"),
    (["export", "{tiny}", "--exporter", "tvm"], 2, "Invalid value for '--exporter'"),
    (["export", "HuggingFaceTB/SmolLM2-135M-Instruct"], 1, "not reachable"),
])
def test_bad_input_is_one_line_with_an_exit_code(args, code, message, tiny_llama_dir, tmp_path):
    (tmp_path / "not.gguf").write_bytes(b"hello, not a gguf")
    (tmp_path / "file").write_text("a file where a directory should be")
    args = [a.format(tmp=tmp_path, tiny=tiny_llama_dir) for a in args]
    if "--out" not in args:
        args += ["--out", str(tmp_path / "store")]
    t0 = time.monotonic()
    r = edgegen(*args)
    assert r.returncode == code, r.stderr
    assert message in r.stderr
    assert "Traceback" not in r.stderr
    if code == 1:
        errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
        assert len(errors) == 1
    assert time.monotonic() - t0 < 120  # fails before any export work
    store = tmp_path / "store"
    assert not store.exists() or list(store.iterdir()) == []


def test_debug_shows_the_traceback(tmp_path):
    r = edgegen("--debug", "export", str(tmp_path / "missing.gguf"))
    assert r.returncode == 1 and "Traceback" in r.stderr and "SourceError" in r.stderr


# What transformers, optimum and torch print while a GGUF is dequantized and traced.
LIBRARY_NOISE = (
    "default legacy behaviour",              # the GGUF tokenizer
    "`torch_dtype` is deprecated",
    "Converting and de-quantizing GGUF",     # tqdm's bar ...
    "it/s]",                                 # ... and any other
    "TracerWarning",
    "UserWarning",
    "Found different candidate ONNX initializers",  # optimum's logger
)


@pytest.mark.slow
@pytest.mark.parametrize("debug", [False, True], ids=["default", "debug"])
def test_export_keeps_library_noise_out_of_the_terminal(debug, tmp_path):
    """A GGUF source through optimum meets every kind of library noise; by default only
    edgegen's progress reaches stderr and stdout is the JSON alone; --debug shows it all."""
    gguf = write_tiny_llama_gguf(tmp_path / "tiny.gguf")
    env = {**os.environ, "EDGEGEN_CACHE": str(tmp_path / "cache")}  # dequantize afresh
    args = ["export", str(gguf), "--precision", "fp32", "--exporter", "optimum",
            "--out", str(tmp_path / "store"), "--threads", "1", "--json"]
    r = edgegen(*(["--debug"] if debug else []), *args, env=env)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["precision"] == "fp32"
    assert "validating against the PyTorch fp32 reference" in r.stderr
    shown = [noise for noise in LIBRARY_NOISE if noise in r.stderr]
    if debug:
        assert "`torch_dtype` is deprecated" in shown and "it/s]" in shown, r.stderr
    else:
        assert shown == [], r.stderr
