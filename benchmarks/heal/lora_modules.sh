#!/usr/bin/env bash
# Which linear layers LoRA heals best, on the block-influence 1.2x plan of run.sh (run that first): adapters on the
# attention projections only, the MLP only, or all (run.sh's), the same steps and data; held-out perplexity of all
# three on pydoc and GSM8K in one run. How lora's default (modules=all) was chosen.
#   bash benchmarks/heal/lora_modules.sh      (~10 minutes on 2 cores)
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=benchmarks/heal
WORK=${SKIPLM_HEAL_WORK:-results/heal-work}
STEPS=${STEPS:-30}
PLAN="$OUT/sweep/plans/block-influence-1.2.json"
heals=(--heal "$WORK/heals/block-influence-1.2-lora")
for modules in attention mlp; do
    dir="$WORK/heals/block-influence-1.2-lora-$modules"
    [ -f "$dir/heal.json" ] || .venv/bin/skiplm heal --plan "$PLAN" --method lora --data self --sequences 128 \
        --length 256 --option steps=$STEPS --option eval_every=10 --option patience=0 --option held_out=8 \
        --option modules=$modules -o "$dir"
    heals+=(--heal "$dir")
done
.venv/bin/skiplm eval --plan "$PLAN" "${heals[@]}" --corpus pydoc --corpus gsm8k --tokens 2048 -o "$OUT/lora-modules"
