"""The genai export path: onnxruntime-genai's model builder.

The builder writes one fused decoder graph (GroupQueryAttention, rotary embeddings and a KV
buffer shared between past and present) plus ``genai_config.json``; on SmolLM2-135M it
decodes several times faster than an Optimum export at equal precision. It runs as a child
process: it holds the whole model in memory while it writes, and its imports stay out of
ours. onnxruntime-genai is pinned at 0.15.2: the 0.16+ builders import names that exist only
in transformers 5.x, while optimum-onnx 0.1.0 pins transformers < 4.58.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

from exporters.errors import ExportError, UnsupportedModel
from exporters.graph_fusion import fuse_matmulnbits_siblings

log = logging.getLogger(__name__)

# Text-only decoders the 0.15.2 builder turns into a single decoder graph.
ARCHITECTURES = frozenset({
    "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
    "Phi3ForCausalLM", "PhiForCausalLM", "GemmaForCausalLM", "Gemma2ForCausalLM",
    "Gemma3ForCausalLM", "GraniteForCausalLM", "OlmoForCausalLM", "NemotronForCausalLM",
    "SmolLM3ForCausalLM", "InternLM2ForCausalLM", "Ernie4_5ForCausalLM",
})
# Copied from the source folder: the builder writes the tokenizer files but not these.
EXTRA_FILES = ("config.json", "generation_config.json")
BUILDER_TIMEOUT_S = 3600


def supports(config: dict) -> bool:
    return bool(set(config.get("architectures") or ()) & ARCHITECTURES)


def build(hf_dir: Path, out_dir: Path, *, precision: str, device: str, context_length: int,
          threads: int, cache_dir: Path) -> None:
    """Run the builder on ``hf_dir`` into ``out_dir`` and fix up genai_config.json."""
    config = json.loads((hf_dir / "config.json").read_text())
    if not supports(config):
        raise UnsupportedModel(
            f"the genai builder does not support {config.get('architectures')}"
        )
    cmd = [
        sys.executable, "-m", "onnxruntime_genai.models.builder",
        "-i", str(hf_dir), "-o", str(out_dir), "-p", precision,
        "-e", "cuda" if device == "cuda" else "cpu", "-c", str(cache_dir),
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    log.info("running the genai builder", extra={"cmd": cmd})
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True,
                              timeout=BUILDER_TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        raise ExportError(f"the genai builder did not finish in {BUILDER_TIMEOUT_S} s") from exc
    if proc.returncode != 0:
        tail = _last_error_line(proc.stderr + proc.stdout)
        raise ExportError(f"the genai builder failed (exit {proc.returncode}): {tail}")
    if not (out_dir / "model.onnx").is_file() or not (out_dir / "genai_config.json").is_file():
        raise ExportError("the genai builder finished but wrote no model.onnx/genai_config.json")
    for name in EXTRA_FILES:
        if (hf_dir / name).is_file() and not (out_dir / name).exists():
            shutil.copy2(hf_dir / name, out_dir / name)
    set_runtime_options(out_dir / "genai_config.json", context_length=context_length,
                        threads=threads)
    if device == "cpu":
        fuse_matmulnbits_siblings(out_dir / "model.onnx")


def set_runtime_options(path: Path, *, context_length: int, threads: int) -> None:
    """Write the context length and an explicit thread count into genai_config.json.

    Left unset, onnxruntime-genai's intra-op thread pool ran ~40 % slower on 2 cores here;
    the agent overrides the count from its own ``--threads``.
    """
    cfg = json.loads(path.read_text())
    cfg["model"]["context_length"] = context_length
    cfg["search"]["max_length"] = context_length
    opts = cfg["model"]["decoder"].setdefault("session_options", {})
    opts["intra_op_num_threads"] = threads
    path.write_text(json.dumps(cfg, indent=4) + "\n")


def _last_error_line(text: str) -> str:
    lines = [ln.strip() for ln in text.replace("\r", "\n").splitlines() if ln.strip()]
    for ln in reversed(lines):
        if "Error" in ln or "error" in ln:
            return ln[:400]
    return lines[-1][:400] if lines else "no output"
