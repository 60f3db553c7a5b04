#!/usr/bin/env bash
# GPU runs of the demo-pair benchmark (issue 6). Logs and results go to $OUT (default bench/results).
#   bash bench/gpu_issue6.sh demo      # 2k-16k (CTX), T = 0 and 1 (TEMPS; sampled chains), 2 prompts x 256 tokens;
#                                      # TREES and EXTRA (default --argmax-chains) replace those arguments
#   bash bench/gpu_issue6.sh graphs    # 8k, T = 0: the same run with XLA command buffers extended to
#                                      # while loops and conditionals (the demo model is launch-bound)
#   bash bench/gpu_issue6.sh profile   # demo shapes at 8k, float32, XLA attention: AR, verification, draft and
#                                      # commit per tree, with a trace per loop: ops and device ms per phase
#   bash bench/gpu_issue6.sh chains    # 8k, T = 0, chains of 5 and 4 with and without the 2048-token draft
#                                      # vocabulary, at PREC (auto = highest for float32) and DTYPE (float32)
#   bash bench/gpu_issue6.sh distill   # continue the shipped draft's stage 2 with train.distill = each of
#                                      # DISTILLS (STEPS steps on DATA), then held-out tau of the shipped and
#                                      # the new drafts (2k / 8k / 16k, NPROMPTS prompts, chain of 4 and the
#                                      # 69-node tree, T = 0); drafts under runs/, all results in one tarball
set -uo pipefail
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
phase=${1:?phase}
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | awk '{print $2}')
case "$phase" in
  demo)
    timeout "${LIMIT:-280}" python -m bench.bench_demo --num-prompts 2 --contexts ${CTX:-2048 4096 8192 16384} --new-tokens 256 \
      --temperatures ${TEMPS:-0 1} --trees ${TREES:-chain=1,1,1,1,1 default small=2,4,4,4,4} ${EXTRA:---argmax-chains} \
      --out "$OUT/demo_${gpu}${TAG:-}.json" > "$OUT/demo_${gpu}${TAG:-}.log" 2>&1; echo "demo rc=$?"; tail -30 "$OUT/demo_${gpu}${TAG:-}.log"
    ;;
  graphs)  # demo_H200_cmdbuf_while.json: compare with the 8k T = 0 rows of the demo phase
    XLA_FLAGS="--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,WHILE,CONDITIONAL --xla_gpu_graph_min_graph_size=1" \
      timeout "${LIMIT:-190}" python -m bench.bench_demo --num-prompts 2 --contexts 8192 --new-tokens 256 \
      --temperatures 0 --trees chain=1,1,1,1,1 default small=2,4,4,4,4 --out "$OUT/demo_${gpu}_cmdbuf_while.json" \
      > "$OUT/demo_cmdbuf.log" 2>&1; echo "rc=$?"; tail -6 "$OUT/demo_cmdbuf.log"
    ;;
  profile)  # e2e_longspec-demo_<gpu>_xla.json (+ .log)
    timeout "${LIMIT:-300}" python bench/bench_e2e.py --model longspec-demo --dtype float32 --impl xla --contexts 8192 \
      --trees "1 1 1 1 1" "1 1 1 1" "2 4 4 4 4" "4 16 16 16 16" --loop-trees "1 1 1 1 1" "1 1 1 1" "2 4 4 4 4" \
      "4 16 16 16 16" --draft-vocab-sizes 2048 --steps 32 --profile-dir /tmp/prof_demo --out "$OUT" \
      > "$OUT/e2e_longspec-demo_${gpu}.log" 2>&1; echo "rc=$?"; grep -v "^\s*\[" "$OUT/e2e_longspec-demo_${gpu}.log" | tail -40
    ;;
  chains)  # demo_<gpu>_chains<TAG>.json
    timeout "${LIMIT:-280}" python -m bench.bench_demo --num-prompts 2 --contexts 8192 --new-tokens 256 --temperatures 0 \
      --trees chain=1,1,1,1,1 chain4=1,1,1,1 --draft-vocab top2048=longspec_jax/demo/draft_vocab/top2048.npy \
      --matmul-precision "${PREC:-auto}" --dtype "${DTYPE:-float32}" --out "$OUT/demo_${gpu}_chains${TAG:-}.json" \
      > "$OUT/demo_${gpu}_chains${TAG:-}.log" 2>&1; echo "rc=$?"; tail -12 "$OUT/demo_${gpu}_chains${TAG:-}.log"
    ;;
  distill)  # distill_<gpu>.tgz: metrics, logs, bench JSON per draft, the trained drafts
    D=${DATA:-data/corpus/train_s3.jsonl}
    [ -f "$D" ] || xz -dk "$D.xz"
    W=/tmp/distill; mkdir -p "$W"; drafts="shipped=longspec_jax/demo/draft"
    for a in ${DISTILLS:-1.0 0.5}; do
      name=d${a/./}
      timeout "${TLIMIT:-170}" python -m train.run --config train/configs/demo_draft_stage2.yaml "data.paths=[$D]" \
        model.target=longspec_jax/demo/target model.draft_init=longspec_jax/demo/draft train.steps=${STEPS:-1200} \
        optim.lr=${LR:-4e-4} data.seed=3 train.seed=3 train.distill=$a checkpoint.export_dir=runs/$name \
        log.metrics=$W/train_${name}.jsonl log.every=20 > "$W/train_${name}.log" 2>&1
      echo "train $name rc=$?"; tail -1 "$W/train_${name}.jsonl"
      [ -f runs/$name/model.safetensors ] && drafts="$drafts $name=runs/$name"
    done
    for spec in $drafts; do
      name=${spec%%=*}
      timeout "${BLIMIT:-120}" python -m bench.bench_demo --draft "${spec#*=}" --num-prompts ${NPROMPTS:-4} \
        --contexts ${CTX:-2048 8192 16384} --new-tokens 256 --temperatures 0 --trees default tree69=4,16,16,16,16 \
        --out "$W/demo_${gpu}_${name}.json" > "$W/demo_${name}.log" 2>&1
      echo "bench $name rc=$?"; grep "tau" "$W/demo_${name}.log" | tail -6
    done
    tar czf "$OUT/distill_${gpu}.tgz" -C / tmp/distill $(ls -d runs/d* 2>/dev/null | sed 's|^|'"$PWD"'/|' | sed 's|^/||')
    ;;
esac
