#!/usr/bin/env bash
# Install what the tests need (scripts/install.sh) and run the whole test suite in two runs:
# the fast layer (fakes and local processes: mostly waiting on sockets and subprocesses) on
# three pytest-xdist workers, then the slow layer (exports, real models, fleets: CPU-bound,
# and some measure time) alone, so that it keeps both cores.
#   bash scripts/test.sh              the whole suite (what CI runs)
#   bash scripts/test.sh fast         the fast layer alone
# Other arguments go to pytest, in both runs. The exit status is the first failing run's.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export EDGEGEN_STORE="${EDGEGEN_STORE:-$PWD/.cache/test-store}"
layers=(fast slow)
if [ "${1:-}" = fast ]; then
    layers=(fast)
    shift
fi
status=0
for layer in "${layers[@]}"; do
    # --durations: each layer lists its slowest tests, to keep the suite's time in view
    if [ "$layer" = fast ]; then select=(-m "not slow" -n 3); else select=(-m slow); fi
    select+=(--durations=20)
    echo "== the $layer layer: pytest ${select[*]} $*" >&2
    rc=0
    .venv/bin/python -m pytest "${select[@]}" "$@" || rc=$?
    # 5: the arguments selected no test of this layer
    if [ "$rc" -ne 0 ] && [ "$rc" -ne 5 ] && [ "$status" -eq 0 ]; then status=$rc; fi
done
exit "$status"
