#!/usr/bin/env bash
# Every GPU test and benchmark of the kernels, in one call: bash benchmarks/gpu_suite.sh OUTDIR
#
# How a session lent a GPU runs it (the GPU machine has no network: nothing is installed there;
# it has jax 0.11.2 with CUDA, and gets a copy of the working tree):
#   run(command="PYTHONPATH=. bash benchmarks/gpu_suite.sh $OUT/gpu", timeout_s=600)
# then read $OUT/gpu/*.log, $OUT/gpu/junit.xml and $OUT/gpu/kernels-gpu-<date>.json from the
# returned files; copy the JSON into benchmarks/results/ and commit it with the table in the note.
# Steps (each logs to OUTDIR; a failing step does not stop the next, the exit status is the worst):
#   1. nvidia-smi and jax's view of the device
#   2. pytest tests/test_kernels.py with DZJAX_KERNEL=pallas, slow cases included: the shared
#      suite against the compiled kernels (TestDeltaMatmulPallas, TestMultiDeltaPallas) and the
#      interpret / XLA classes for comparison
#   3. the full kernels benchmark (Pallas path) -> OUTDIR/kernels-gpu-<date>.json, stopped after
#      BENCH_BUDGET_S seconds (default 300, to fit one 600 s call with the tests; the JSON then says
#      "truncated": true and a second call with only this step, e.g.
#      `python benchmarks/kernels.py --implementation pallas --out $OUT`, completes it)
set -u
OUT=${1:?usage: benchmarks/gpu_suite.sh OUTDIR}
mkdir -p "$OUT"
export PYTHONPATH=${PYTHONPATH:-.}
PY=${PYTHON:-python}  # the machine's jax with CUDA, not a CPU venv carried along
status=0

{ nvidia-smi || true; "$PY" -c 'import jax; print(jax.__version__, jax.devices())'; } \
  > "$OUT/device.log" 2>&1 || status=1

DZJAX_KERNEL=pallas "$PY" -m pytest tests/test_kernels.py -q -m "slow or not slow" \
  --junitxml="$OUT/junit.xml" > "$OUT/pytest.log" 2>&1 || status=1
tail -n 5 "$OUT/pytest.log"

"$PY" benchmarks/kernels.py --implementation pallas --budget-s "${BENCH_BUDGET_S:-300}" --out "$OUT" > "$OUT/benchmark.log" 2>&1 || status=1
tail -n 3 "$OUT/benchmark.log"
exit $status
