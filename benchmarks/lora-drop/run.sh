#!/usr/bin/env bash
# LoRA-Drop benchmark on the default model (SmolLM2-135M, 30 layers: the paper's rule makes 22 droppable).
#   1. corrections trained (rank 8) for K = 2 and K = 4 with the KL objective, and for K = 2 with the paper's LM
#      loss, on the paper's droppable layers; and for K = 2 (KL) on the 18 layers of lowest block influence (so that
#      it drops 9 layers per token on average, as the block-influence 1.3x plan removes 9 blocks) — on 120 (+ 8
#      held-out) sequences of 256 tokens the full model generated itself (the same cached text `skiplm heal` trains
#      on in benchmarks/heal), each run bounded to TRAIN_MINUTES (bf16 autocast);
#   2. bench.py: held-out perplexity (pydoc, gsm8k: text no training or calibration read), decode speed at batch 1
#      and 8 paired with the full model (interleaved rounds, warm-up, median of paired ratios), prefill speed and the
#      KV-cache bytes after a decode — LoRA-Drop next to block-influence plans and a LoRA heal from benchmarks/heal
#      (its heal folders are in results/heal-work, made by benchmarks/heal/run.sh).
# Every stage runs under the shared CPU lock, in three holds of under 12 minutes. Resumable: a trained folder and a
# measured stage are kept; an interrupted training run continues (--resume).
#   bash benchmarks/lora-drop/run.sh        (from the repository root)
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=benchmarks/lora-drop
WORK=${SKIPLM_LORA_DROP_WORK:-results/lora-drop-work}
TRAIN_MINUTES=${TRAIN_MINUTES:-4.5}
mkdir -p "$WORK" "$OUT"
export HF_HUB_OFFLINE=1 OUT WORK TRAIN_MINUTES

train() {  # name, K, objective[, droppable] (run inside a lock hold)
    local dir="$WORK/$1"
    [ -f "$dir/lora-drop.json" ] && return 0
    local resume=(); [ -d "$dir.run" ] && resume=(--resume)
    local layers=(); [ -n "${4:-}" ] && layers=(--droppable "$4")
    .venv/bin/skiplm lora-drop smollm2-135m --anchor-every "$2" --rank 8 --objective "$3" --data self \
        --sequences 128 --length 256 --held-out 8 --steps 80 --minutes "$TRAIN_MINUTES" --batch-size 4 \
        --learning-rate 2e-3 --eval-every 20 --patience 0 "${layers[@]}" "${resume[@]}" -o "$dir" 2>&1 | tee "$WORK/$1.log"
}
export -f train

HEALS=${SKIPLM_HEAL_WORK:-results/heal-work}/heals
PLANS=benchmarks/heal/sweep/plans
# the 18 layers of lowest block influence, from the scores the block-influence plans were made with
BI18=$(.venv/bin/python -c "import ast, json; p = json.load(open('$PLANS/block-influence-1.5.json'))['provenance']
s = p['scores']; s = ast.literal_eval(s) if isinstance(s, str) else s; b = s['block_influence']
print(','.join(map(str, sorted(sorted(range(len(b)), key=b.__getitem__)[:18]))))")
ROWS=(--row "LoRA-Drop K=2, no correction=$WORK/k2-untrained"
      --row "LoRA-Drop K=2 (KL)=$WORK/k2-kl" --row "LoRA-Drop K=4 (KL)=$WORK/k4-kl"
      --row "LoRA-Drop K=2, 18 low-influence layers, no correction=$WORK/k2-bi18-untrained"
      --row "block-influence 1.3x=$PLANS/block-influence-1.3.json"
      --row "block-influence 1.3x + LoRA=$HEALS/block-influence-1.3-lora"
      --row "block-influence 1.5x=$PLANS/block-influence-1.5.json")
EXTRA=(--row "LoRA-Drop K=2 (KL)=$WORK/k2-kl" --row "LoRA-Drop K=2 (LM loss)=$WORK/k2-lm"
       --row "LoRA-Drop K=2, 18 low-influence layers (KL)=$WORK/k2-bi18-kl")

# untrained skippers: no correction (pure reuse of the anchor's update)
[ -f "$WORK/k2-untrained/lora-drop.json" ] || .venv/bin/skiplm lora-drop smollm2-135m --anchor-every 2 --no-train \
    -o "$WORK/k2-untrained"
[ -f "$WORK/k2-bi18-untrained/lora-drop.json" ] || .venv/bin/python -c "import dataclasses
from skiplm.lora_drop import load_lora_drop
s = load_lora_drop('$WORK/k2-untrained')
dataclasses.replace(s, droppable=tuple(int(i) for i in '$BI18'.split(','))).save('$WORK/k2-bi18-untrained')"

# holds of the lock, each only for work left to do (a hold under 12 minutes):
#   1. the paper-layer KL trainings;  2. quality and speed of every row (one run each);
#   3. the LM-loss and low-influence KL trainings;  4. their quality (perplexity is deterministic: a separate run
#      scores them on the same tokens; their speed is that of the same schedule untrained, measured in 2)
missing() { for f in "$@"; do [ -f "$f" ] || return 0; done; return 1; }
if missing "$WORK"/{k2-kl,k4-kl}/lora-drop.json; then
    flock /tmp/skiplm-cpu.lock bash -c 'train k2-kl 2 kl && train k4-kl 4 kl'
fi
if missing "$OUT"/{quality,speed}.json; then
    ROW_WORDS=$(printf '%q ' "${ROWS[@]}")
    flock /tmp/skiplm-cpu.lock bash -c "{ [ -f $OUT/quality.json ] || .venv/bin/python $OUT/bench.py $ROW_WORDS \
        --stage quality -o $OUT; } && { [ -f $OUT/speed.json ] || .venv/bin/python $OUT/bench.py $ROW_WORDS \
        --stage speed -o $OUT; }"
fi
.venv/bin/python "$OUT/bench.py" "${ROWS[@]}" --stage summary -o "$OUT"
if [ "${SKIP_EXTRA:-0}" != 1 ]; then
    if missing "$WORK"/{k2-lm,k2-bi18-kl}/lora-drop.json; then
        flock /tmp/skiplm-cpu.lock bash -c "train k2-lm 2 lm && train k2-bi18-kl 2 kl $BI18"
    fi
    if missing "$OUT/extra/quality.json"; then
        flock /tmp/skiplm-cpu.lock .venv/bin/python "$OUT/bench.py" "${EXTRA[@]}" --stage quality -o "$OUT/extra"
    fi
fi
