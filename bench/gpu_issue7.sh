#!/usr/bin/env bash
# The GPU runs behind bench/results/*_H100* and *_H200* of the scale benchmark (issue 7), one phase
# per device call (each fits in 10 minutes). Logs and results go to $OUT (default bench/results).
#   bash bench/gpu_issue7.sh tune      # prefix-kernel tuning table + 8B e2e at 32k (+ profile)
#   bash bench/gpu_issue7.sh e2e4k128k # 8B e2e at 4k and 128k, PyTorch baseline
#   bash bench/gpu_issue7.sh tp32b     # (nvidia-h200-x2) QwQ-32B shapes on 2 GPUs vs 1 GPU
#   bash bench/gpu_issue7.sh tpprofile # (nvidia-h200-x2) the same at 4k, profiled: where the TP step's time goes
#   bash bench/gpu_issue7.sh tpflags   # (nvidia-h200-x2) TP AR step at 4k under XLA/NCCL collective settings
#   bash bench/gpu_issue7.sh tpdiag    # (nvidia-h200-x2) 16-layer QwQ TP AR step: compiled collectives, per-kernel profile
#   bash bench/gpu_issue7.sh qwq1      # (one H200) QwQ-32B e2e breakdown at 32k and 4k
#   bash bench/gpu_issue7.sh qwqtorch  # (one H200) PyTorch baseline at QwQ-32B shapes
#   bash bench/gpu_issue7.sh small128k # 8B verification of the smaller trees at 128k
#   bash bench/gpu_issue7.sh pingpong  # prefix kernel: GPU tests, then warpgroup ping-pong / padding-warpgroup
#                                      # skip against a previous kernel (BASE: a file from `git show
#                                      # REV:pallas_kernels/prefix_decode.py`), installs this GPU's table
#   bash bench/gpu_issue7.sh lone      # prefix kernel: GPU tests, then the lone last tile's knobs at T = 69 / 37
#                                      # (tune_prefix --lone), merged into this GPU's table (E2E=1: + 8B verify at 32k)
#   bash bench/gpu_issue7.sh overlap   # prefix kernel: GPU tests, then FA3's intra-warpgroup overlap off / on per variant
#                                      # (tune_prefix --overlap), merged into this GPU's table (E2E=1: + 8B verify at 32k)
#   bash bench/gpu_issue7.sh gemm      # weight matmuls at verification row counts under XLA GEMM settings
#                                      # (VARIANTS, each its own process), then the 8B verification at 32k
#                                      # under each of E2EVARIANTS
set -uo pipefail
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
phase=${1:?phase}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())"
# A prefix-kernel phase: GPU tests (-k $1), then a quick tune_prefix sweep (its flags: the rest)
# merged into this GPU's table; E2E=1: then the 8B verification at 32k with the new table.
kernel_phase() {
  local name=$1 tests=$2; shift 2
  timeout "${TESTLIMIT:-200}" python -m pytest -q -m gpu tests/test_kernels.py -k "${TESTK:-$tests}" \
    > "$OUT/${name}_tests.log" 2>&1
  echo "tests rc=$?"; tail -4 "$OUT/${name}_tests.log"
  timeout "${LIMIT:-330}" python bench/tune_prefix.py --quick --install "$@" --reps 3 --out "$OUT" \
    > "$OUT/${name}_tune.log" 2>&1
  echo "tune rc=$?"; grep -v "^{" "$OUT/${name}_tune.log" | tail -10
  cp pallas_kernels/tuning/*.json "$OUT/" 2>/dev/null
  if [ -n "${E2E:-}" ]; then
    timeout "${E2ELIMIT:-300}" python bench/bench_e2e.py --contexts 32768 --trees "4 16 16 16 16" "1 1 1 1" \
      --loop-trees "4 16 16 16 16" --steps 8 --out "$OUT" > "$OUT/${name}_e2e.log" 2>&1
    echo "e2e rc=$?"; grep -v "^  \[" "$OUT/${name}_e2e.log" | tail -8
  fi
}
case "$phase" in
  tune)  # prefix-kernel tuning table (installed into pallas_kernels/tuning/)
    timeout 260 python bench/tune_prefix.py --install --T 69 37 16 5 --S 32768 131072 4096 --reps 3 \
      --out "$OUT" > "$OUT/tune.log" 2>&1; echo "tune rc=$?"; tail -22 "$OUT/tune.log"
    cp pallas_kernels/tuning/*.json "$OUT/" 2>/dev/null
    ;;
  lone)  # prefix kernel: GPU tests, then the lone last tile's knobs (split count, key halves shared)
    # swept at T = 69 / 37 and merged into this GPU's table; E2E=1: then the 8B verification at 32k
    # shellcheck disable=SC2086
    kernel_phase lone "lone_tile or two_warpgroups" --lone --T ${TS:-69 37} --S ${SS:-32768 131072 4096}
    ;;
  overlap)  # prefix kernel: GPU tests of the intra-warpgroup overlap, then each quick variant with it off and on
    # (same run), merged into this GPU's table; E2E=1: then the 8B verification at 32k with the new table
    # shellcheck disable=SC2086
    kernel_phase overlap overlap --overlap ${BASE:+--baseline "$BASE"} ${TUNEARGS:-} --T ${TS:-69 37} \
      --S ${SS:-32768 131072}
    ;;
  pingpong)
    timeout "${TESTLIMIT:-240}" python -m pytest -q -m gpu tests/test_kernels.py -k "${TESTK:-prefix}" > "$OUT/pingpong_tests.log" 2>&1
    echo "tests rc=$?"; tail -4 "$OUT/pingpong_tests.log"
    timeout "${LIMIT:-330}" python bench/tune_prefix.py --quick --install ${BASE:+--baseline "$BASE"} \
      --T ${TS:-69 37 16 5 1} --S ${SS:-32768 131072 4096} --reps 3 --out "$OUT" > "$OUT/pingpong_tune.log" 2>&1
    echo "tune rc=$?"; grep -v "^{" "$OUT/pingpong_tune.log" | tail -20
    cp pallas_kernels/tuning/*.json "$OUT/" 2>/dev/null
    if [ -n "${E2E:-}" ]; then  # then the 8B verification / iteration at 32k with the new table
      timeout "${E2ELIMIT:-300}" python bench/bench_e2e.py --contexts 32768 --trees "4 16 16 16 16" "2 4 4 4 4" "1 1 1 1" \
        --loop-trees "4 16 16 16 16" --steps 8 --out "$OUT" > "$OUT/pingpong_e2e.log" 2>&1
      echo "e2e rc=$?"; grep -v "^  \[" "$OUT/pingpong_e2e.log" | tail -8
    fi
    ;;
  gemm)
    declare -A GF=(
      [base]=""
      [cublas]="--xla_gpu_enable_triton_gemm=false"
      [noautotune]="--xla_gpu_autotune_level=0"
      [cublaslt]="--xla_gpu_enable_cublaslt=true"
    )
    for v in ${VARIANTS:-base cublas noautotune}; do
      XLA_FLAGS="${GF[$v]}" timeout "${VLIMIT:-150}" python bench/bench_gemm_rows.py --rows ${ROWS:-1 5 64 69} --tag "$v" \
        --out "$OUT" > "$OUT/gemm_$v.log" 2>&1
      echo "== $v rc=$?"; grep " ms " "$OUT/gemm_$v.log"
    done
    for v in ${E2EVARIANTS:-}; do
      XLA_FLAGS="${GF[$v]}" timeout "${E2ELIMIT:-200}" python bench/bench_e2e.py --contexts 32768 \
        --trees "4 16 16 16 16" "1 1 1 1" --loop-trees --steps 8 --out "$OUT/e2e_$v" > "$OUT/e2e_$v.log" 2>&1
      echo "== e2e $v rc=$?"; grep "AR \|tree " "$OUT/e2e_$v.log"
    done
    ;;
  e2e32k)  # 8B e2e at 32k: verification per tree, draft, commit, iteration, draft vocabulary, profile
    timeout 560 python bench/bench_e2e.py --contexts 32768 --trees "4 16 16 16 16" "4 8 8 8 8" "2 4 4 4 4" "1 1 1 1" \
      --loop-trees "4 16 16 16 16" "2 4 4 4 4" --steps 16 --draft-vocab-sizes 32768 --profile-dir "$OUT/profile" \
      --out "$OUT" > "$OUT/e2e_32k.log" 2>&1; echo "e2e rc=$?"; grep -v "^  \[" "$OUT/e2e_32k.log" | tail -25
    ;;
  e2e4k128k)  # PyTorch baseline, then 8B e2e at 4k and 128k
    timeout 200 python bench/bench_torch_baseline.py --contexts 4096 32768 131072 --new-tokens 64 \
      --out "$OUT" > "$OUT/torch.log" 2>&1; echo "torch rc=$?"; grep -v Warning "$OUT/torch.log" | tail -8
    timeout 360 python bench/bench_e2e.py --contexts 4096 131072 --trees "4 16 16 16 16" "4 8 8 8 8" "2 4 4 4 4" "1 1 1 1" \
      --loop-trees "4 16 16 16 16" --steps 16 --draft-vocab-sizes 32768 \
      --out "$OUT" > "$OUT/e2e_4k_128k.log" 2>&1; echo "e2e rc=$?"; grep -v "^  \[" "$OUT/e2e_4k_128k.log" | tail -25
    ;;
  tp32b)  # tensor parallel over 2 H200s against one H200, QwQ-32B shapes (both copies resident on GPU 0)
    XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 timeout 540 python bench/bench_tp.py --model qwq-32b-preview --tensor 2 \
      --contexts 32768 4096 --steps 8 --skip-demo --out "$OUT" > "$OUT/tp_32b.log" 2>&1; echo "tp rc=$?"
    grep -v "^  \[" "$OUT/tp_32b.log" | tail -12
    ;;
  tpprofile)  # the same at 4k with a profile of each AR loop: per-GPU busy time vs wall time per step
    XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 timeout "${LIMIT:-400}" python bench/bench_tp.py --model qwq-32b-preview --tensor 2 \
      --contexts 4096 --steps 8 --skip-demo --profile-dir /tmp/tp_profile --out "$OUT" > "$OUT/tp_profile.log" 2>&1
    echo "tp rc=$?"; grep -v "compile+run" "$OUT/tp_profile.log" | tail -12
    ;;
  tpflags)  # TP AR step at 4k under collective settings (VARIANTS: names below); each variant in its own process
    declare -A FLAGS=(
      [base]=""
      [oneshot]="--xla_gpu_unsupported_use_all_reduce_one_shot_kernel=true"
      [synccoll]="--xla_gpu_disable_async_collectives=ALLREDUCE,ALLGATHER"
      [cmdbufcoll]="--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,COLLECTIVES"
      [oneshot_sync]="--xla_gpu_unsupported_use_all_reduce_one_shot_kernel=true --xla_gpu_disable_async_collectives=ALLREDUCE,ALLGATHER"
      [symmetric]="--xla_gpu_experimental_enable_nccl_symmetric_buffers=true"
    )
    for v in ${VARIANTS:-base oneshot synccoll cmdbufcoll oneshot_sync symmetric}; do
      mkdir -p "$OUT/tpflags/$v"
      extra=""; [ "$v" = base ] && extra="--profile-dir /tmp/tp_profile_$v" || extra="--skip-single"
      XLA_FLAGS="${FLAGS[$v]}" timeout 40 python bench/bench_collectives.py --devices 2 --hidden 5120 --no-ceilings \
        --iters 1000 --out "$OUT/tpflags/$v" > "$OUT/tpflags/$v/collectives.log" 2>&1
      echo "== $v collectives rc=$?"; grep "psum\|all_gather" "$OUT/tpflags/$v/collectives.log" | head -3
      XLA_FLAGS="${FLAGS[$v]}" XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 timeout "${VLIMIT:-120}" python bench/bench_tp.py \
        --model qwq-32b-preview --tensor 2 --contexts 4096 --steps 16 --skip-demo --ar-only $extra \
        --out "$OUT/tpflags/$v" > "$OUT/tpflags/$v/tp.log" 2>&1
      echo "== $v tp rc=$?"; grep "ctx\|profile" "$OUT/tpflags/$v/tp.log"; tail -2 "$OUT/tpflags/$v/tp.log"
    done
    ;;
  tpdiag)  # which collectives the GPU-compiled TP step really runs, and what each kernel costs (16 layers: quick)
    for v in ${VARIANTS:-base}; do
      case $v in base) f="";; nocmdbuf) f="--xla_gpu_enable_command_buffer=";; nosplit) f="--xla_gpu_enable_all_reduce_splitter=false";; *) f="$v";; esac
      XLA_FLAGS="$f" XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 timeout "${VLIMIT:-150}" python bench/bench_tp.py \
        --model qwq-32b-preview --layers 16 --tensor 2 --contexts 4096 --steps 16 --skip-demo ${ARGS:---skip-single} \
        --profile-dir /tmp/tpdiag_$RANDOM --out "$OUT/tpdiag_$v" > "$OUT/tpdiag_$v.log" 2>&1
      echo "== $v rc=$?"; grep -v "compile+run" "$OUT/tpdiag_$v.log" | cut -c1-700 | head -40
    done
    ;;
  qwq1)  # QwQ-32B e2e on one H200 (CTX: contexts, default 32k then 4k)
    timeout "${LIMIT:-330}" python bench/bench_e2e.py --model qwq-32b-preview --contexts ${CTX:-32768 4096} \
      --trees "4 16 16 16 16" "2 4 4 4 4" "1 1 1 1 1" --loop-trees "4 16 16 16 16" --steps 8 \
      --draft-vocab-sizes 32768 --out "$OUT" > "$OUT/e2e_qwq.log" 2>&1; echo "e2e rc=$?"
    grep -v "^  \[" "$OUT/e2e_qwq.log" | tail -14
    ;;
  qwqtorch)  # the PyTorch baseline at QwQ-32B shapes (torch.compile of 64 layers takes minutes)
    timeout "${LIMIT:-330}" python bench/bench_torch_baseline.py --model qwq-32b-preview --contexts ${CTX:-32768 4096} \
      --new-tokens 32 --out "$OUT" > "$OUT/torch_qwq.log" 2>&1; echo "torch rc=$?"; grep -v -i warn "$OUT/torch_qwq.log" | tail -6
    ;;
  small128k)  # 8B: verification of the smaller trees at 128k (the 69-node row exists)
    timeout "${LIMIT:-200}" python bench/bench_e2e.py --contexts 131072 --trees "4 8 8 8 8" "2 4 4 4 4" "1 1 1 1 1" \
      --loop-trees none --steps 8 --out "$OUT/small128k" > "$OUT/e2e_small128k.log" 2>&1; echo "e2e rc=$?"
    grep -v "^  \[" "$OUT/e2e_small128k.log" | tail -8
    ;;
esac
