#!/usr/bin/env bash
# Install edgegen, export the built-in SmolLM2-135M-Instruct to an int4 bundle, and bring up a
# local fleet (registry, MQTT broker, three regional edges, a central agent, the router) that
# answers one chat request over REST and one over MQTT, then stops.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
.venv/bin/edgegen export builtin:smollm2-135m-instruct --precision int4
exec .venv/bin/edgegen up --demo
