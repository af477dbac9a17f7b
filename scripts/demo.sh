#!/usr/bin/env bash
# The main job, offline, ~5 minutes on 2 CPU cores: on the default model (SmolLM2-135M), lossless speculative decoding
# against plain greedy (identical text, measured speedup), the best static plan (shipped, `search`) and its LoRA-healed
# version against the full model (held-out perplexity, measured speed), a uniform 1.25x plan for comparison; writes
# results/demo/ (report.html, summary.md, demo.json, ...) and ends with what to try next. Arguments go to `skiplm demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1
exec .venv/bin/skiplm demo "$@"
