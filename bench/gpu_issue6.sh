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
esac
