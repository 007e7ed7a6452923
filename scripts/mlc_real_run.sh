#!/usr/bin/env bash
# MLC on the real built-in 0.5B model with LoRA, reported before/after:
#   representation similarity across languages (polyalign probe) and per-language refusal of
#   harmful / benign prompts (polyalign eval, lexicon judge, built-in benchmark's eval split).
# Paradigms: plain DPO (weight 0, the control), DPO+MLC, SFT+MLC on MLC's PKU-SafeRLHF files.
#   bash scripts/mlc_real_run.sh                       # ~1 h on 2 CPU cores
#   OUT=runs/x STEPS=10 PARADIGMS="dpo" bash scripts/mlc_real_run.sh
# Reruns skip finished stages (training resumes from checkpoints; generations are cached).
set -euo pipefail
cd "$(dirname "$0")/.."
P=.venv/bin/polyalign
M=builtin:qwen2.5-coder-0.5b-instruct
OUT=${OUT:-runs/mlc_real}
STEPS=${STEPS:-30}
LANGS=${LANGS:-en,zh,ar,bn,sw}
RUNS=${RUNS:-dpo_plain dpo_mlc sft_mlc}

evaluate() {   # evaluate NAME [--adapter DIR]
  local name=$1; shift
  [ -f "$OUT/$name/probe.json" ] || $P probe --model $M "$@" --languages "$LANGS" --limit 32 --out "$OUT/$name/probe.json"
  for task in harmful benign; do
    [ -f "$OUT/$name/$task/results.json" ] || $P eval --model $M "$@" --task builtin-$task --languages "$LANGS" \
      --limit 8 --max-new-tokens 24 --out "$OUT/$name/$task"
  done
}

evaluate base
for run in $RUNS; do
  paradigm=${run%%_*}
  weight=0.8; [ "${run#*_}" = plain ] && weight=0
  if [ ! -f "$OUT/$run/final/log_history.json" ]; then
    resume=(); ls -d "$OUT/$run"/checkpoint-* >/dev/null 2>&1 && resume=(--resume)
    $P train recipes/mlc_$paradigm.yaml --output-dir "$OUT/$run" "${resume[@]}" \
      max_steps=$STEPS per_device_train_batch_size=2 gradient_accumulation_steps=1 learning_rate=1e-4 \
      save_steps=10 logging_steps=5 mlc.weight=$weight "mlc.languages=[${LANGS}]" mlc.max_length=256
  fi
  evaluate "$run" --adapter "$OUT/$run/final"
done
.venv/bin/python scripts/mlc_table.py "$OUT"
