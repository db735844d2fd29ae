#!/usr/bin/env bash
# Eighth session (BENCHMARKS.md), GPU call 3: every GPU-marked test in tests/, on the session's code.
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:/tmp/site OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
nvidia-smi -L; lscpu | grep -m1 "Model name"
timeout 560 python3 -m pytest -q -m gpu -p no:cacheprovider --durations=8 tests > "$OUT/gpu_tests.log" 2>&1
echo "tests rc=$?"
grep -E "passed|failed" "$OUT/gpu_tests.log" | tail -2; grep -E "^FAILED|^ERROR" "$OUT/gpu_tests.log" | head -12
grep -A10 "slowest" "$OUT/gpu_tests.log" | head -11
