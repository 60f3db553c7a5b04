#!/usr/bin/env bash
# Train the demo pair end to end with train.run (issue 6):
#   1. the target: train/configs/demo_target.yaml (language model from scratch, 16k tokens)
#   2. the draft, the paper's recipe scaled down: stage 1 (1024 tokens, Anchor-Offset indices),
#      then stage 2 (16k tokens) from the stage-1 export
#   3. the ablation: the same two stages with Anchor-Offset indices off in stage 1 (same budget),
#      run at the same time as 2 on the same GPU (each process takes under half its memory; the
#      shipped stage 2 ran the two drafts one after the other, see longspec_jax/demo/MODEL_CARD.md)
#   4. bfloat16 packaging (scripts/package_demo.py)
#
# Usage: bash scripts/train_demo.sh [RUNS_DIR]     (default runs/demo)
# Environment: CORPUS (train jsonl, default data/corpus/train.jsonl), TARGET_MIN / S1_MIN / S2_MIN
# (--time-limit of each stage, minutes), EXTRA (overrides added to every stage, e.g. for a smoke run).
set -euo pipefail
RUNS=${1:-runs/demo}
CORPUS=${CORPUS:-data/corpus/train.jsonl}
TARGET_MIN=${TARGET_MIN:-9.5}
S1_MIN=${S1_MIN:-3}
S2_MIN=${S2_MIN:-4}
EXTRA=${EXTRA:-}
PY=${PYTHON:-python3}
mkdir -p "$RUNS"
common="data.paths=[$CORPUS] data.cache_dir=$RUNS/token_cache $EXTRA"
log() { echo "[$(date +%H:%M:%S)] $*"; }

log "target"
$PY -m train.run --config train/configs/demo_target.yaml --time-limit "$TARGET_MIN" $common \
  checkpoint.dir="$RUNS/target_ckpt" checkpoint.export_dir="$RUNS/target" \
  log.metrics="$RUNS/target_metrics.jsonl" > "$RUNS/target.log" 2>&1

draft() {  # name, anchor-offset on/off
  local name=$1 ao=$2
  $PY -m train.run --config train/configs/demo_draft_stage1.yaml --time-limit "$S1_MIN" $common \
    model.target="$RUNS/target" positions.enabled="$ao" checkpoint.dir="$RUNS/${name}_s1_ckpt" \
    checkpoint.export_dir="$RUNS/${name}_s1" log.metrics="$RUNS/${name}_s1_metrics.jsonl" \
    > "$RUNS/${name}_s1.log" 2>&1
  $PY -m train.run --config train/configs/demo_draft_stage2.yaml --time-limit "$S2_MIN" $common \
    model.target="$RUNS/target" model.draft_init="$RUNS/${name}_s1" checkpoint.dir="$RUNS/${name}_s2_ckpt" \
    checkpoint.export_dir="$RUNS/$name" log.metrics="$RUNS/${name}_s2_metrics.jsonl" \
    > "$RUNS/${name}_s2.log" 2>&1
}
log "drafts: with Anchor-Offset (draft) and without (draft_noao), in parallel"
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.45}
draft draft true & a=$!
draft draft_noao false & b=$!
wait $a; wait $b
log "packaging"
$PY scripts/package_demo.py --runs "$RUNS" --out "$RUNS/pack" --drafts draft draft_noao draft_s1 draft_noao_s1
log "done"
