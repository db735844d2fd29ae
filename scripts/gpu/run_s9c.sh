#!/usr/bin/env bash
# Eighth session (BENCHMARKS.md), GPU call 3: every test file with GPU-marked tests (the others need the
# server packages, which this machine lacks), on the session's code.
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:/tmp/site OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
nvidia-smi -L; lscpu | grep -m1 "Model name"
timeout 560 python3 -m pytest -q -m gpu -p no:cacheprovider --durations=8 tests/test_argmax.py tests/test_capture.py tests/test_dense_prefill.py tests/test_gemv.py tests/test_gemv_choice.py tests/test_gpu.py tests/test_graph_inputs.py tests/test_inputs.py tests/test_lookahead_gpu.py tests/test_mixed_step.py tests/test_mixed_warmup.py tests/test_moe_gpu.py tests/test_paged_kernel.py tests/test_prefill_kernel.py tests/test_speculative_gpu.py tests/test_step_cost.py > "$OUT/gpu_tests.log" 2>&1
echo "tests rc=$?"
grep -E "passed|failed" "$OUT/gpu_tests.log" | tail -2; grep -E "^FAILED|^ERROR" "$OUT/gpu_tests.log" | head -12
grep -A10 "slowest" "$OUT/gpu_tests.log" | head -11
