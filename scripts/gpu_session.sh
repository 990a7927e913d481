#!/usr/bin/env bash
# The device machine's checks and benchmarks, one stage per call (each < 10 min):
#   bash scripts/gpu_session.sh tests   # every `pytest -m gpu` test (kernels, models; > 4 min)
#   bash scripts/gpu_session.sh kernels # the kernels' `pytest -m gpu` tests only (~3 min)
#   bash scripts/gpu_session.sh bench   # python -m tools.bench_train --all (every recipe's GPU preset, one table);
#                                       # carrying .anchors (scripts/fetch_anchors.sh) adds mamba2:gpu_340m's
#                                       # PyTorch + mamba_ssm anchor row and the tokens/s ratio (issue 18)
#   bash scripts/gpu_session.sh generate  # python -m tools.bench_generate on the dense preset vs HF transformers
#   bash scripts/gpu_session.sh verify  # kernels' GPU tests + packed-row costs, time-boxed (~9 min)
#   bash scripts/gpu_session.sh ebt_repro [RUNS]  # the EBT reproduction's next call (MINUTES=6 of training, then the report)
#   bash scripts/gpu_session.sh moe_repro [RUNS]  # MoE balance runs still missing (MINUTES=8.3)
#   bash scripts/gpu_session.sh next    # docs/notes/gpu_plan.md's front rows for whichever card came (~9 min):
#                                       # H200: the H200-sized presets (row 3) + the dense profile; H100: the
#                                       # EBT reproduction (row 6; carry what docs/notes/gpu_plan.md says)
# dense_lm:gpu_1b and simplicial:gpu_1b are sized for one H200 (141 GB): ask for nvidia-h200 with needs_h200; the
# other presets fit an H100 (80 GB) at their defaults (docs/benchmarks.md, 2026-12-07).
# On the lent GPU image (docs/benchmarks.md, "How to measure"): carry .whl (scripts from the workplace fetch
# grain + jax-triton wheels into it); logs go to $OUT when it is set.
set -uo pipefail
cd "$(dirname "$0")/.."
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu_session}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv,noheader

repro_train() {  # TOOL ROOT RUNS MINUTES: one resumable training call of a tools.repro_* pipeline, then its status
  export JAX_COMPILATION_CACHE_DIR=/tmp/jaxcache
  python3 -m "tools.$1" train "$2" --runs "$3" --max-minutes "$4" 2>&1 | grep -v absl | tr '\r' '\n' \
    | grep -v "it/s\|s/it" | tee "$OUT/$1_train.log" | tail -25
  python3 -m "tools.$1" status "$2"
}

case "${1:-tests}" in
  tests) AXL_TEST_GPU=1 python3 -m pytest -m gpu -o addopts="" -p no:cacheprovider -q -rf --durations=10 \
           tests/kernels tests/models "${@:2}" 2>&1 | tee "$OUT/gpu_tests.log" | tail -40 ;;
  kernels) AXL_TEST_GPU=1 python3 -m pytest -m gpu -o addopts="" -p no:cacheprovider -q -rf --tb=line \
           tests/kernels "${@:2}" 2>&1 | tee "$OUT/gpu_kernel_tests.log" | tail -40 ;;
  bench) python3 -m tools.bench_train --all --steps "${STEPS:-5}" --json "$OUT/bench_all.json" "${@:2}" 2>&1 \
           | tee "$OUT/bench_all.log" | tail -30 ;;
  generate) python3 -m tools.bench_generate --recipe dense_lm --preset gpu_1b --batch 1,32 "${@:2}" 2>&1 \
           | tee "$OUT/bench_generate.log" | tail -30 ;;
  verify)  # docs/notes/gpu_plan.md row 2 in one call (~9 min, fits an H100): each step time-boxed
    timeout 300 bash "$0" kernels
    timeout 60 python3 -m tests.kernels.test_ssd_gpu --out "$OUT/ssd_packed.json" 2>&1 | tail -12
    timeout 180 python3 -m tools.bench_simplicial --packed 2048,512 --out "$OUT" 2>&1 | tee "$OUT/simplicial_packed.log" \
      | tail -14 ;;
  next)  # one card-branching call: what the queue needs first from this card (carry: docs/notes/gpu_plan.md)
    export HOME=/tmp TORCHINDUCTOR_CACHE_DIR=/tmp/ti TRITON_CACHE_DIR=/tmp/tc  # the torch anchor's caches
    if nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H200; then
      OUT="$OUT/presets" STEPS=5 timeout 330 bash "$0" bench --only simplicial:gpu_1b,dense_lm:gpu_1b --preset-timeout 150
      timeout 200 python3 -m tools.bench_train --recipe dense_lm --preset gpu_1b --steps 5 --no-save --kernel-profile 3 \
        2>&1 | grep -v "slow_operation\|Constant folding" | tee "$OUT/kprof_dense.log" | tail -40
    else
      bash "$0" ebt_repro
    fi ;;
  ebt_repro)  # row 6: the EBT reproduction's run (docs/results/ebt.md); the same call again continues it
    R=runs/ebt_repro
    repro_train repro_ebt $R "${2:-ebt}" "${MINUTES:-6}"
    python3 -m tools.repro_ebt report $R --finished-only 2>&1 | grep -v absl | tail -40
    tar czf "$OUT/ebt_repro.tgz" $R/stages.jsonl $R/tokenizer.json $R/repro.json $R/*/metrics.jsonl $R/*/config.json \
      $R/report ;;
  moe_repro)  # row 5: MoE balance runs (docs/results/moe_balance.md); each finished run persists by its metrics
    R=runs/moe_balance
    repro_train repro_moe $R "${2:-aux_loss,no_balance,aux_free_seq,limited}" "${MINUTES:-8.3}"
    tar czf "$OUT/moe_repro.tgz" $R/stages.jsonl $R/repro.json $R/*/metrics.jsonl $R/*/config.json ;;
  *) echo "usage: $0 tests|kernels|bench|generate|verify|next|ebt_repro|moe_repro [args]" >&2; exit 2 ;;
esac
