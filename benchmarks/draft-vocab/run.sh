#!/usr/bin/env bash
# Reduced-vocabulary draft heads on the default model (SmolLM2-135M, vocabulary 49,152): the lean int8-dynamic draft
# proposing only the 4,096 / 8,192 / 16,384 most frequent tokens (counted on the second half of gsm8k and pydoc) or
# the whole vocabulary, at batch 1 on GSM8K chat prompts and pydoc text, all paired with plain greedy decoding in one
# `skiplm bench-speculative` run; then each draft's step time measured alone, and held-out coverage.
#   bash benchmarks/draft-vocab/run.sh      (from the repository root; ~10 minutes of CPU on 2 cores)
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=benchmarks/draft-vocab
SIZES=4096,8192,16384,0
LOCK=(flock /tmp/skiplm-cpu.lock)
"${LOCK[@]}" env HF_HUB_OFFLINE=1 .venv/bin/skiplm bench-speculative smollm2-135m --draft-dtype int8-dynamic \
    --draft-vocab "$SIZES" --prompts gsm8k,pydoc --limit 8 --batch-sizes 1 --new-tokens 128 --repeats 2 -o "$OUT"
"${LOCK[@]}" env HF_HUB_OFFLINE=1 .venv/bin/python "$OUT/measure.py" "$SIZES" "$OUT"
# the same drafts with the speed monitor off (every draft speculates throughout): the drafts' own comparison
"${LOCK[@]}" env HF_HUB_OFFLINE=1 .venv/bin/python "$OUT/no_fallback.py" "$SIZES" "$OUT"
