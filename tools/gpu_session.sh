#!/usr/bin/env bash
# Validate and benchmark bao_fast on a lent GPU machine (torch, triton, transformers there; no network, no vLLM).
#
#   tools/gpu_session.sh STAGE...      stages in the order given; the first lent-GPU call is
#   tools/gpu_session.sh tune bench test                  (results first: about 8-10 minutes on an H200)
#     test       run the kernel/op/packing/model tests (CUDA-only ones included; not the AOT compile checks
#                nor the C++ source checks, which target the CI toolchain, nor the small-shape tuner test,
#                which the tune stage covers at the real shape)
#     tune       python -m bao_fast.kernels.logprobs_tune at PERF.md's shape -> $OUT/tuned/*.json; later stages
#                of the same call launch with these tiles (BAO_FAST_TUNED_DIR)
#     bench      benchmarks/bench_logprobs.py headline shape (--head-only)
#     sweep      benchmarks/bench_logprobs.py full N x V sweep
#     bench-ops  advantages, clipped-ratio loss and packing benchmarks
#     trainer    packed (flash varlen) vs padded log-prob forward; trainer step breakdown with the hf engine
#
# A failing stage does not stop the next, and each stage is stopped after STAGE_TIMEOUT seconds (default
# 280) so that a hung one leaves time for the rest: its exit status goes to $OUT/status.txt (the script exits
# 1 if any failed). The package is installed editable with no index (the CUDA extension builds with nvcc +
# ninja) unless this machine already has the same build (stamp: a hash of setup.py and csrc/). Baselines that
# are not on the machine (liger-kernel, cut-cross-entropy) can travel as wheels in .whl/ (carry it; see
# /work/.library/device/README.md); they are installed to /tmp/site when present, and a failed wheel install
# only leaves those baselines out.
#
# What comes back (the device tool returns at most 8 files): $OUT/status.txt, the results this call wrote
# ($OUT/<op>-<device>.json), the tuned tiles ($OUT/tuned/*.json, rewritten after every knob) and every log
# in $OUT/logs.tar.gz (install, nvidia-smi, per-stage output). Results and logs are copied to $OUT after each
# stage, so a call killed at its time limit keeps what its finished stages wrote. $OUT defaults to ./gpu-out
# without the device tool.
set -uo pipefail
OUT=${OUT:-$PWD/gpu-out}
PY=${PYTHON:-python3}
STAGE_TIMEOUT=${STAGE_TIMEOUT:-280}
LOGS=/tmp/bao_fast_gpu_logs/logs  # outside $OUT: only the archive of it comes back (the 8-file limit)
STAMP=${BAO_FAST_INSTALL_STAMP:-/tmp/bao_fast_install.stamp}
export PYTHONUNBUFFERED=1
rm -rf "$LOGS" && mkdir -p "$LOGS" "$OUT"
touch "$LOGS/.start"

install() {
  if compgen -G ".whl/*.whl" >/dev/null; then
    if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      .whl/*.whl >"$LOGS/wheels.log" 2>&1; then
      export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    else
      tail -20 "$LOGS/wheels.log"
      echo "wheels rc=1 (the baselines they carry are left out)" | tee -a "$OUT/status.txt"
    fi
  fi
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv >"$LOGS/gpu.csv" || true
  local hash
  hash=$(cat setup.py csrc/* 2>/dev/null | sha256sum | cut -d' ' -f1)
  if [[ -f $STAMP && $(cat "$STAMP") == "$hash" ]] && "$PY" -c "import torch, bao_fast._C" 2>/dev/null; then
    echo "install: reusing this machine's build ($hash)" >"$LOGS/install.log"
    return 0
  fi
  "$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e . >"$LOGS/install.log" 2>&1 \
    || { tail -40 "$LOGS/install.log"; return 1; }
  echo "$hash" >"$STAMP"
}

# Copy to $OUT the results written by this call (never the committed CPU files) and an archive of the logs.
collect() {
  find benchmarks/results -maxdepth 1 -name '*.json' -newer "$LOGS/.start" -exec cp {} "$OUT/" \;
  tar czf "$OUT/logs.tar.gz.tmp" -C "$(dirname "$LOGS")" --exclude .start logs \
    && mv "$OUT/logs.tar.gz.tmp" "$OUT/logs.tar.gz"
}
trap collect EXIT

# Run "$@" (stopped after STAGE_TIMEOUT s) with its output teed to $LOGS/<name>.log; record the exit status
# (124: timed out); collect what it wrote.
stage_run() {
  local name=$1; shift
  local start=$SECONDS
  timeout --kill-after=15 "$STAGE_TIMEOUT" "$@" 2>&1 | tee "$LOGS/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "$name rc=$rc $((SECONDS - start))s" | tee -a "$OUT/status.txt"
  (( rc == 0 )) || failed=1
  collect
}

failed=0
if ! install; then
  echo "install rc=1" | tee -a "$OUT/status.txt"
  exit 1
fi
for stage in "$@"; do
  case "$stage" in
    test)
      stage_run test "$PY" -m pytest -q -n 4 -p no:cacheprovider -k "not aot and not tuned_tiles_match" \
        tests/kernels tests/ops tests/data tests/models tests/train/test_optim.py tests/train/test_rl_step.py ;;
    tune)
      stage_run tune "$PY" -m bao_fast.kernels.logprobs_tune --out-dir "$OUT/tuned"
      if compgen -G "$OUT/tuned/*.json" >/dev/null; then export BAO_FAST_TUNED_DIR="$OUT/tuned"; fi ;;
    bench)
      stage_run bench_logprobs "$PY" benchmarks/bench_logprobs.py --head-only ;;
    sweep)
      stage_run bench_logprobs_sweep "$PY" benchmarks/bench_logprobs.py ;;
    bench-ops)
      for script in bench_advantages bench_policy_loss bench_packing; do
        stage_run "$script" "$PY" "benchmarks/$script.py"
      done ;;
    trainer)
      stage_run bench_packing_forward "$PY" benchmarks/bench_packing_forward.py
      stage_run bench_trainer_step "$PY" benchmarks/bench_trainer_step.py --engine hf ;;
    *)
      echo "unknown stage '$stage' (test tune bench sweep bench-ops trainer)" | tee -a "$OUT/status.txt" >&2
      failed=1 ;;
  esac
done
exit "$failed"
