#!/usr/bin/env bash
# Eighth session (BENCHMARKS.md), GPU call 7: the review commit (the logits rows' inputs through _Rows, the
# idle-budget decision in two methods): the GPU tests of the files it touches.
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:/tmp/site OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
nvidia-smi -L; lscpu | grep -m1 "Model name"
timeout 300 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_inputs.py tests/test_mixed_step.py \
  tests/test_dense_prefill.py tests/test_gpu.py tests/test_mixed_warmup.py tests/test_speculative_gpu.py \
  > "$OUT/gpu_tests.log" 2>&1
echo "tests rc=$?"; grep -E "passed|failed" "$OUT/gpu_tests.log" | tail -1; grep -E "^FAILED|^ERROR" "$OUT/gpu_tests.log" | head
