#!/usr/bin/env bash
# GPU runs of the demo-pair benchmark (issue 6). Logs and results go to $OUT (default bench/results).
#   bash bench/gpu_issue6.sh demo      # 2k-16k (CTX), T = 0 and 1 (TEMPS; sampled chains), 2 prompts x 256 tokens
#   bash bench/gpu_issue6.sh graphs    # 8k, T = 0: the same run with XLA command buffers extended to
#                                      # while loops and conditionals (the demo model is launch-bound)
set -uo pipefail
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
phase=${1:?phase}
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | awk '{print $2}')
case "$phase" in
  demo)
    timeout "${LIMIT:-280}" python -m bench.bench_demo --num-prompts 2 --contexts ${CTX:-2048 4096 8192 16384} --new-tokens 256 \
      --temperatures ${TEMPS:-0 1} --trees chain=1,1,1,1,1 default small=2,4,4,4,4 --argmax-chains \
      --out "$OUT/demo_${gpu}${TAG:-}.json" > "$OUT/demo_${gpu}${TAG:-}.log" 2>&1; echo "demo rc=$?"; tail -30 "$OUT/demo_${gpu}${TAG:-}.log"
    ;;
  graphs)  # demo_H200_cmdbuf_while.json: compare with the 8k T = 0 rows of the demo phase
    XLA_FLAGS="--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,WHILE,CONDITIONAL --xla_gpu_graph_min_graph_size=1" \
      timeout "${LIMIT:-190}" python -m bench.bench_demo --num-prompts 2 --contexts 8192 --new-tokens 256 \
      --temperatures 0 --trees chain=1,1,1,1,1 default small=2,4,4,4,4 --out "$OUT/demo_${gpu}_cmdbuf_while.json" \
      > "$OUT/demo_cmdbuf.log" 2>&1; echo "rc=$?"; tail -6 "$OUT/demo_cmdbuf.log"
    ;;
esac
