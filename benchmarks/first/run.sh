#!/usr/bin/env bash
# FiRST benchmark on the default model (SmolLM2-135M): routers trained for 1.1 / 1.2 / 1.3x (30 steps of 4 x 256
# self-generated tokens each, LoRA r16 beside them, threshold calibrated to the blocks a latency model measured now
# says the target needs; ABLATION=1: at 1.2x also with straight-through gates), against the static plans at the same
# target (search, block-influence: the healing benchmark's plans) and their LoRA-healed versions (30 steps on the
# same text), each measured in one run: held-out perplexity on pydoc and GSM8K (one `skiplm eval`), decode and
# prefill speed at batch 1 and 8 paired with the full model (one `skiplm bench` per target). Every skiplm command
# holds the shared CPU lock (a few commands per hold, each hold under ~12 minutes). Resumable: each step skips what
# is already there.
#   bash benchmarks/first/run.sh            (from the repository root; ~45 minutes of CPU on 2 cores)
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=benchmarks/first
WORK=${SKIPLM_FIRST_WORK:-results/first-work}     # FiRST folders (adapters: 10 MB each): not committed
HEALS=${SKIPLM_HEAL_WORK:-results/heal-work}/heals  # LoRA heal folders of benchmarks/heal/run.sh (made below if missing)
PLANS=benchmarks/heal/sweep/plans                  # search / block-influence plans at 1.1, 1.2, 1.3x
LOCK=/tmp/skiplm-cpu.lock
SKIPLM=(env HF_HUB_OFFLINE=1 .venv/bin/skiplm)
TARGETS=(1.1 1.2 1.3)
TRAIN=(--data self --sequences 128 --length 256 --steps 30 --option eval_every=10 --option patience=0
       --option held_out=8)
mkdir -p "$WORK" "$OUT"

locked() { flock "$LOCK" "$@"; }  # one hold of the shared CPU lock for a few steps: `locked bash -c '...'`

# 1. FiRST routers per target (and, with ABLATION=1, the straight-through ablation at 1.2x).
train() {  # name target extra-options...
    local dir="$WORK/$1" target=$2; shift 2
    [ -f "$dir/first.json" ] && return 0
    local resume=(); [ -d "$dir.run" ] && resume=(--resume)
    "${SKIPLM[@]}" first smollm2-135m --speedup "$target" "${TRAIN[@]}" "$@" "${resume[@]}" -o "$dir"
}
heal() {  # method target: the LoRA-healed plan (the healing benchmark's, if it ran; else healed here the same way)
    local dir="$HEALS/$1-$2-lora"
    [ -f "$dir/heal.json" ] && return 0
    local resume=(); [ -d "$dir.run" ] && resume=(--resume)
    "${SKIPLM[@]}" heal smollm2-135m --plan "$PLANS/$1-$2.json" --method lora --data self --sequences 128 \
        --length 256 --option steps=30 --option eval_every=10 --option patience=0 --option held_out=8 \
        "${resume[@]}" -o "$dir"
}
[ -f "$WORK/first-1.1/first.json" ] || locked bash -c "$(declare -p SKIPLM TRAIN WORK); $(declare -f train); train first-1.1 1.1"
[ -f "$WORK/first-1.2/first.json" ] && [ -f "$WORK/first-1.3/first.json" ] || \
    locked bash -c "$(declare -p SKIPLM TRAIN WORK); $(declare -f train); train first-1.2 1.2 && train first-1.3 1.3"
if [ "${ABLATION:-0}" = 1 ]; then
    locked bash -c "$(declare -p SKIPLM TRAIN WORK); $(declare -f train); train first-1.2-st 1.2 --option straight_through=true"
fi
for t in "${TARGETS[@]}"; do
    for method in search block-influence; do
        [ -f "$HEALS/$method-$t-lora/heal.json" ] || locked bash -c "$(declare -p SKIPLM HEALS PLANS); $(declare -f heal); heal $method $t"
    done
done
ST=(); [ -f "$WORK/first-1.2-st/first.json" ] && ST=(--plan "$WORK/first-1.2-st/first.json")

# 2. Held-out perplexity of every row, in one run (2,048 tokens of each corpus; training read neither), and the
#    speed of the 1.1x rows in the same hold.
rows=()
for t in "${TARGETS[@]}"; do rows+=(--plan "$WORK/first-$t/first.json"); done
rows+=("${ST[@]}")
for t in "${TARGETS[@]}"; do rows+=(--plan "$PLANS/search-$t.json" --plan "$PLANS/block-influence-$t.json"); done
for t in "${TARGETS[@]}"; do rows+=(--heal "$HEALS/search-$t-lora" --heal "$HEALS/block-influence-$t-lora"); done
evaluate() { [ -f "$OUT/eval/eval.json" ] || "${SKIPLM[@]}" eval "${rows[@]}" --corpus pydoc --corpus gsm8k \
    --tokens 2048 -o "$OUT/eval"; }

# 3. Speed, one run per target: FiRST (and its decisions-only row), the static plans, the healed plans (LoRA unmerged
#    and merged), prefill of 64 tokens and 24 decode steps after 64-token prompts, batch 1 and 8, paired with the
#    full model (3 rounds after a warm-up, order alternating).
bench() {
    local t=$1 extra=()
    [ "$t" = 1.2 ] && extra=("${ST[@]}")
    [ -f "$OUT/bench-$t/bench.json" ] || "${SKIPLM[@]}" bench --plan "$WORK/first-$t/first.json" \
        "${extra[@]}" --plan "$PLANS/search-$t.json" --plan "$PLANS/block-influence-$t.json" \
        --heal "$HEALS/search-$t-lora" --heal "$HEALS/block-influence-$t-lora" --batch-sizes 1,8 --prompt-tokens 64 \
        --decode-prompt-tokens 64 --new-tokens 24 --repeats 3 --warmup 1 --no-compare-pruned -o "$OUT/bench-$t"
}
measure() { evaluate && bench 1.1; }
[ -f "$OUT/eval/eval.json" ] && [ -f "$OUT/bench-1.1/bench.json" ] || \
    locked bash -c "$(declare -p SKIPLM OUT WORK HEALS PLANS rows ST); $(declare -f evaluate bench measure); measure"
[ -f "$OUT/bench-1.2/bench.json" ] && [ -f "$OUT/bench-1.3/bench.json" ] || \
    locked bash -c "$(declare -p SKIPLM OUT WORK HEALS PLANS ST); $(declare -f bench); bench 1.2 && bench 1.3"

# 4. One table (results.json, results.md, frontier.png); README.md's results section is written from it.
.venv/bin/python benchmarks/first/summarize.py "$OUT" "$WORK"
