#!/usr/bin/env bash
# Healing benchmark on the default model (SmolLM2-135M): search and block-influence (ShortGPT) plans at 1.1 / 1.2 /
# 1.3 / 1.5x (sweep/: unhealed, every target), healed at 1.1 / 1.2 / 1.3x (bridge, lora, bridge+lora; search plans
# skip sublayers, so only lora; SKIP_HEALING=none heals the 1.5x plans too) and measured in one run each: held-out
# perplexity on pydoc and GSM8K, decode speed at batch 1 paired with the full model (LoRA unmerged and merged),
# greedy agreement. Planners calibrate and healing trains on text the full model generated itself, so both
# evaluation corpora are held out from everything. Resumable: each step skips what is already there, and an
# interrupted training run continues (--resume).
#   bash benchmarks/heal/run.sh            (from the repository root; ~100 minutes on 2 slow cores)
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=benchmarks/heal
WORK=${SKIPLM_HEAL_WORK:-results/heal-work}  # self-generated text file, heal folders (large): not committed
SKIPLM=(.venv/bin/skiplm)
STEPS=${STEPS:-30}
SEQUENCES=128   # self-generated sequences of 256 tokens (4 batches of 32); 8 held out for the training evaluations
mkdir -p "$WORK" "$OUT"

# 1. Text the full model writes itself (cached under ~/.cache/skiplm/self-generated), also as a corpus file.
[ -f "$WORK/self.txt" ] || "${SKIPLM[@]}" self-generate --sequences $SEQUENCES --length 256 -o "$WORK/self.txt"

# 2. The plans, and the unhealed points (a resumable sweep: finished points are kept in points.jsonl).
SWEEP=(bench --sweep --methods search,block-influence --targets 1.1,1.2,1.3,1.5 --calibration-corpus "$WORK/self.txt"
       --sequences 2 --length 256 --corpus pydoc --tokens 2048 --prompts gsm8k --limit 8 --agree-tokens 48
       --batch-sizes 1 --prompt-tokens 128 --decode-prompt-tokens 64 --new-tokens 32 --repeats 3 --warmup 1
       -o "$OUT/sweep")
"${SKIPLM[@]}" "${SWEEP[@]}"

# 3. Heal every plan. bridge: 16 sequences; lora / bridge+lora: STEPS steps of 4 sequences (bf16 autocast).
TRAIN=(--data self --sequences $SEQUENCES --length 256 --option steps=$STEPS --option eval_every=10
       --option patience=0 --option held_out=8)
heals=()
for plan in "$OUT"/sweep/plans/*.json; do
    name=$(basename "$plan" .json)
    case "$name" in *-"${SKIP_HEALING:-1.5}") continue ;; esac  # see README.md: the 1.5x plans are measured unhealed only
    case "$name" in search-*) methods="lora" ;; *) methods="bridge lora bridge+lora" ;; esac
    for method in $methods; do
        dir="$WORK/heals/$name-$method"
        if [ ! -f "$dir/heal.json" ]; then
            if [ "$method" = bridge ]; then
                "${SKIPLM[@]}" heal --plan "$plan" --method bridge --data self --sequences 16 --length 256 -o "$dir"
            else
                resume=(); [ -d "$dir.run" ] && resume=(--resume)
                "${SKIPLM[@]}" heal --plan "$plan" --method "$method" "${TRAIN[@]}" "${resume[@]}" -o "$dir"
            fi
        fi
        heals+=(--heal "$dir")
    done
done
plans=(); for plan in "$OUT"/sweep/plans/*.json; do
    case "$plan" in *-"${SKIP_HEALING:-1.5}".json) continue ;; esac; plans+=(--plan "$plan"); done

# 4. (The sweep takes the heal folders too, `--heal DIR`, and draws their frontier beside the unhealed one; here the
#    three runs below measure every row once, in one run each.)

# 5. In one run each: perplexity on both held-out corpora, decode speed at batch 1 (every row paired with the full
#    model; a LoRA heal unmerged and merged) and greedy agreement with the full model, every plan unhealed and healed.
[ -f "$OUT/eval/eval.json" ] || "${SKIPLM[@]}" eval "${plans[@]}" "${heals[@]}" --corpus pydoc --corpus gsm8k \
    --tokens 1024 -o "$OUT/eval"
[ -f "$OUT/bench/bench.json" ] || "${SKIPLM[@]}" bench "${plans[@]}" "${heals[@]}" --batch-sizes 1 \
    --prompt-tokens 64 --new-tokens 24 --repeats 3 --no-compare-pruned -o "$OUT/bench"
[ -f "$OUT/agree/agreement.json" ] || "${SKIPLM[@]}" agree "${plans[@]}" "${heals[@]}" --prompts gsm8k --limit 8 \
    --new-tokens 48 -o "$OUT/agree"

# 6. One table of it all (README.md's results section is written from it).
.venv/bin/python benchmarks/heal/summarize.py "$OUT" "$WORK"
