#!/usr/bin/env bash
# Install what the tests need (scripts/install.sh) and run the whole test suite.
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export EDGEGEN_STORE="${EDGEGEN_STORE:-$PWD/.cache/test-store}"
exec .venv/bin/python -m pytest "$@"
