#!/usr/bin/env bash
# Eighth session (BENCHMARKS.md), GPU call 2: every issue-14 figure in one bench prefill run with the lone
# prompt's idle budget, the pruned last layer and the 256-row squares; the new GPU tests; the probe's profile.
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:/tmp/site OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
nvidia-smi -L; lscpu | grep -m1 "Model name"
timeout 380 python3 -m aioffload.cli bench prefill --synthetic llama3-8b --synthetic-dir /tmp/s --skip-kernels \
  --hybrid off > "$OUT/prefill.log" 2>&1
echo "prefill rc=$?"
timeout 90 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_inputs.py tests/test_dense_prefill.py \
  > "$OUT/gpu_tests.log" 2>&1
tail -1 "$OUT/gpu_tests.log"; grep -E "^FAILED|^ERROR" "$OUT/gpu_tests.log" | head -8
timeout 100 python3 scripts/gpu/probe_s9_32k.py --synthetic-dir /tmp/s > "$OUT/probe.log" 2>&1
echo "probe rc=$?"; grep -E "^ttft|^kernels|^burst" "$OUT/probe.log"; grep -E " ms +[0-9]+x" "$OUT/probe.log" | head -8
grep -E "nobody decoding|fresh chunk shapes|memory:|warm-up: |served decode|ITL p99" "$OUT/prefill.log" | head -12
grep -v "safetensors:\|loading weights\|model-0" "$OUT/prefill.log" | tail -34
