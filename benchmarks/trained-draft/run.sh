#!/usr/bin/env bash
# Trained drafts (skiplm draft-train: a LoRA adapter on a skip-set draft, distilled toward the full model) against the
# best untrained draft (the full-depth int8-dynamic copy) and the same skip sets untrained, in the same
# bench-speculative run, on GSM8K and pydoc prompts the training never saw. See README.md.
#
#   bash benchmarks/trained-draft/run.sh            # plans, training (each skip set once), then the benchmark
#   STAGES="bench" bash benchmarks/trained-draft/run.sh
#
# Every step that loads the model holds the shared CPU lock (/tmp/skiplm-cpu.lock) and stays under ~12 minutes.
# The drafts (plans + adapters, ~18 MiB per adapter) and the training run folders go to $DRAFTS (default
# results/trained-draft/, not committed); the benchmark's files and the adapters' training records to this folder.
set -euo pipefail
cd "$(dirname "$0")/../.."
HERE=benchmarks/trained-draft
DRAFTS=${DRAFTS:-results/trained-draft}
STAGES=${STAGES:-"train bench"}
SKIPLM=${SKIPLM:-.venv/bin/skiplm}
PYTHON=${PYTHON:-.venv/bin/python}
LOCK=(flock /tmp/skiplm-cpu.lock)
MINUTES=${MINUTES:-4}  # training time bound per adapter
BLOCKS=${BLOCKS:-"2 4"}
export HF_HUB_OFFLINE=1
mkdir -p "$DRAFTS"

if [[ " $STAGES " == *" train "* ]]; then
  # one job, the model loaded once: the plans (the K blocks of lowest Block Influence, what draft-search tries) and an
  # adapter for each (what `skiplm draft-train --plan P --precision int8-dynamic --minutes M --eval-every 40` does)
  "${LOCK[@]}" "$PYTHON" "$HERE/train.py" "$DRAFTS" "$MINUTES" $BLOCKS 2>&1 | tee "$DRAFTS/train.log"
fi

if [[ " $STAGES " == *" bench "* ]]; then
  plans=()
  for k in $BLOCKS; do plans+=(--draft-plan "$DRAFTS/skip$k-int8-dynamic.json" --draft-plan "$DRAFTS/skip$k-lora.json"); done
  # every draft in the same run as plain greedy decoding, both prompt sets (~10 minutes)
  "${LOCK[@]}" "$SKIPLM" bench-speculative --draft-dtype int8-dynamic "${plans[@]}" --prompts gsm8k,pydoc \
      --limit 8 --batch-sizes 1 --new-tokens 128 --repeats 2 -o "$HERE"
  "$PYTHON" "$HERE/summarize.py" "$HERE"
fi
