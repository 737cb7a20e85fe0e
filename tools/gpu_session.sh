#!/usr/bin/env bash
# Validate and benchmark bao_fast on a lent GPU machine (torch, triton, transformers there; no network, no vLLM).
#
#   tools/gpu_session.sh STAGE...      stages, each well under the device tool's 10-minute call limit:
#     test       build the CUDA extension, run the kernel/op/packing/model tests (CUDA-only ones included; not
#                the AOT compile checks, which target the CI toolchain and run without a GPU)
#     tune       python -m bao_fast.kernels.logprobs_tune at PERF.md's shape -> $OUT/tuned/*.json
#     bench      benchmarks/bench_logprobs.py headline shape (--head-only) -> $OUT/*.json
#     sweep      benchmarks/bench_logprobs.py full N x V sweep
#     bench-ops  advantages, clipped-ratio loss and packing benchmarks
#     trainer    packed (flash varlen) vs padded log-prob forward; trainer step breakdown with the hf engine
#
# Every stage installs the package first (editable, no index: the CUDA extension builds with nvcc + ninja and
# is reused while the machine stays warm). Baselines that are not on the machine (liger-kernel,
# cut-cross-entropy) can travel as wheels in .whl/ (see /work/.library/device/README.md); they are installed
# to /tmp/site when present. Logs and results go to $OUT (./gpu-out without the device tool).
set -euo pipefail
OUT=${OUT:-$PWD/gpu-out}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"

install() {
  if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  fi
  "$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1 \
    || { tail -40 "$OUT/install.log"; exit 1; }
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv >"$OUT/gpu.csv" || true
}

copy_results() {
  cp benchmarks/results/*.json "$OUT/" 2>/dev/null || true
}

install
for stage in "$@"; do
  case "$stage" in
    test)
      "$PY" -m pytest -q -n 4 -p no:cacheprovider -k "not aot" tests/kernels tests/ops tests/data tests/models tests/csrc \
        2>&1 | tee "$OUT/test.log" | tail -30 ;;
    tune)
      "$PY" -m bao_fast.kernels.logprobs_tune --out-dir "$OUT/tuned" 2>&1 | tee "$OUT/tune.log" | tail -40 ;;
    bench)
      "$PY" benchmarks/bench_logprobs.py --head-only 2>&1 | tee "$OUT/bench_logprobs.log" | tail -25
      copy_results ;;
    sweep)
      "$PY" benchmarks/bench_logprobs.py 2>&1 | tee "$OUT/bench_logprobs_sweep.log" | tail -60
      copy_results ;;
    bench-ops)
      for script in bench_advantages bench_policy_loss bench_packing; do
        "$PY" "benchmarks/$script.py" 2>&1 | tee "$OUT/$script.log" | tail -20
      done
      copy_results ;;
    trainer)
      "$PY" benchmarks/bench_packing_forward.py 2>&1 | tee "$OUT/bench_packing_forward.log" | tail -20
      "$PY" benchmarks/bench_trainer_step.py --engine hf 2>&1 | tee "$OUT/bench_trainer_step.log" | tail -30
      copy_results ;;
    *)
      echo "unknown stage '$stage' (test tune bench sweep bench-ops trainer)" >&2; exit 2 ;;
  esac
done
