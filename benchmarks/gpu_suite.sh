#!/usr/bin/env bash
# Every GPU test and benchmark, in one call: bash benchmarks/gpu_suite.sh OUTDIR
#
# How a session lent a GPU runs it (the GPU machine has no network: nothing is installed there;
# it has jax 0.11.2 with CUDA, and gets a copy of the working tree):
#   run(command="PYTHONPATH=. bash benchmarks/gpu_suite.sh $OUT/gpu", timeout_s=600)
# then read $OUT/gpu/*.log, $OUT/gpu/junit.xml and $OUT/gpu/kernels-gpu-<date>.json from the
# returned files; copy the JSON into benchmarks/results/ and commit it with the table in the note.
# Steps (each logs to OUTDIR; a failing step does not stop the next, the exit status is the worst):
#   1. nvidia-smi and jax's view of the device
#   2. pytest tests/test_kernels.py and tests/test_kv_cache.py with DZJAX_KERNEL=pallas, slow
#      cases included: the shared suite against the compiled kernels (TestDeltaMatmulPallas,
#      TestMultiDeltaPallas, jax's paged attention) and the interpret / XLA classes for comparison
#   3. the full kernels benchmark (Pallas path) -> OUTDIR/kernels-gpu-<date>.json: decode batches
#      1-64 and prefill 512/2048 (the prefill route), 1 to 32 delta slots and "1 of 8 active",
#      each case one jitted program cycling through >= 8 distinct weight copies (>= 128 MB, never
#      in L2), the bf16 dense matmul beside it, and a profiler breakdown of three cases; the
#      targets' cases run first. Stopped after BENCH_BUDGET_S seconds (default 300, to fit one
#      600 s call with the tests; the JSON then says "truncated": true and a second call with
#      only this step, e.g. `python benchmarks/kernels.py --implementation pallas --out $OUT`,
#      completes it)
#   4. pytest tests/test_serving.py and tests/test_logprobs.py with DZJAX_KERNEL=pallas: batched
#      multi-delta serving on the compiled kernels equals generation on the merged weights, and
#      the log-probs computed in its steps (and dzjax.score's) equal log_softmax of the logits
#   5. the serving benchmark (dzjax vs swap vs merged, decode step with 8 deltas vs base) on a
#      synthetic 12-layer, hidden-1024 model -> OUTDIR/serving-gpu.json (no plot: the machine
#      may lack matplotlib); skipped with SKIP_SERVING_BENCH=1
#   6. the tensor-parallel decode step against mesh size, over every GPU of the machine
#   7. the hot path (benchmarks/hot_path.py, bf16, Pallas kernels): the decode step with fused and
#      unfused projections, and the engine loop with and without its pipeline
#      -> OUTDIR/hot-path-gpu.json; skipped with SKIP_HOT_PATH=1
# Steps 5-6 may need a second call: SKIP_KERNEL_STEPS=1 skips steps 2-3.
set -u
OUT=${1:?usage: benchmarks/gpu_suite.sh OUTDIR}
mkdir -p "$OUT"
export PYTHONPATH=${PYTHONPATH:-.}
PY=${PYTHON:-python}  # the machine's jax with CUDA, not a CPU venv carried along
status=0

{ nvidia-smi || true; "$PY" -c 'import jax; print(jax.__version__, jax.devices())'; } \
  > "$OUT/device.log" 2>&1 || status=1

if [ -z "${SKIP_KERNEL_STEPS:-}" ]; then
  DZJAX_KERNEL=pallas "$PY" -m pytest tests/test_kernels.py tests/test_kv_cache.py -q -m "slow or not slow" \
    --junitxml="$OUT/junit.xml" > "$OUT/pytest.log" 2>&1 || status=1
  tail -n 5 "$OUT/pytest.log"

  "$PY" benchmarks/kernels.py --implementation pallas --budget-s "${BENCH_BUDGET_S:-300}" --out "$OUT" > "$OUT/benchmark.log" 2>&1 || status=1
  tail -n 3 "$OUT/benchmark.log"
fi

DZJAX_KERNEL=pallas "$PY" -m pytest tests/test_serving.py tests/test_logprobs.py -q \
  --junitxml="$OUT/junit-serving.xml" \
  > "$OUT/pytest-serving.log" 2>&1 || status=1
tail -n 5 "$OUT/pytest-serving.log"

if [ -z "${SKIP_SERVING_BENCH:-}" ]; then
  "$PY" -m dzjax.cli bench --synthetic --layers 12 --hidden 1024 --intermediate 2816 --heads 16 \
    --vocab 32000 --deltas 8 --requests 256 --rate inf --max-batch 32 --no-plot \
    --cache-dir "$OUT/cache" --out "$OUT/serving-gpu.json" > "$OUT/serving-bench.log" 2>&1 || status=1
  tail -n 12 "$OUT/serving-bench.log"
fi

"$PY" benchmarks/tensor_parallel.py --layers 12 --hidden 1024 --intermediate 2816 --heads 16 \
  --vocab 32000 --batch 32 --out "$OUT/tensor-parallel-gpu.json" > "$OUT/tensor-parallel.log" 2>&1 || status=1
tail -n 5 "$OUT/tensor-parallel.log"

if [ -z "${SKIP_HOT_PATH:-}" ]; then
  "$PY" benchmarks/hot_path.py --layers 12 --hidden 1024 --vocab 32000 --batch 32 \
    --implementation auto --cache-dir "$OUT/cache" --out "$OUT/hot-path-gpu.json" \
    > "$OUT/hot-path.log" 2>&1 || status=1
  tail -n 8 "$OUT/hot-path.log"
fi
exit $status
