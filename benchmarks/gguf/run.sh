#!/usr/bin/env bash
# GGUF benchmark on the default model (SmolLM2-135M-Instruct, shipped as Q4_1), measured in llama.cpp: the
# block-influence plans at 1.1 / 1.2 / 1.3x exported unhealed and LoRA-healed (changed tensors Q8_0, or Q4_1 to see
# what a 4-bit type leaves of the healing) against the shipped full GGUF — decode and prompt speed (llama-bench, one
# run, ratios) and held-out perplexity (llama-perplexity on pydoc and GSM8K); layer-wise against uniform precision at
# the same file size; a pruned GGUF as llama.cpp's speculative draft for the full one.
#   bash benchmarks/gguf/run.sh     (from the repository root; ~20 minutes on 2 cores once llama.cpp is built, plus
#                                    ~6 minutes to build it and ~12 to heal the three plans where not done before)
set -euo pipefail
cd "$(dirname "$0")/../.."
bash scripts/setup.sh
bash scripts/llama-cpp.sh > /dev/null
BIN=${SKIPLM_LLAMA_CPP:-${SKIPLM_CACHE_DIR:-$HOME/.cache/skiplm}/llama.cpp}/build/bin
HEAL_WORK=${SKIPLM_HEAL_WORK:-results/heal-work}
export HF_HUB_OFFLINE=1

# The healed plans: benchmarks/heal/run.sh's LoRA heals of its block-influence plans (the same command, if missing).
[ -f "$HEAL_WORK/self.txt" ] || .venv/bin/skiplm self-generate --sequences 128 --length 256 -o "$HEAL_WORK/self.txt"
for target in 1.1 1.2 1.3; do
    dir="$HEAL_WORK/heals/block-influence-$target-lora"
    [ -f "$dir/heal.json" ] && continue
    resume=(); [ -d "$dir.run" ] && resume=(--resume)
    .venv/bin/skiplm heal --plan "benchmarks/heal/sweep/plans/block-influence-$target.json" --method lora \
        --data self --sequences 128 --length 256 --option steps=30 --option eval_every=10 --option patience=0 \
        --option held_out=8 "${resume[@]}" -o "$dir"
done

.venv/bin/python benchmarks/gguf/measure.py --bin "$BIN" --heals "$HEAL_WORK/heals" "$@"
