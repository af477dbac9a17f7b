#!/usr/bin/env bash
# The main job: plan a 1.25x uniform skip of the default model, evaluate and bench it against the full model.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1
exec .venv/bin/skiplm demo "$@"
