#!/usr/bin/env bash
# GPU call (2026-12-01, second session, part 5): the changed GPU paths' tests, then the resident ITL.
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:/tmp/site OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
timeout 80 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py tests/test_mixed_step.py \
  tests/test_moe_gpu.py tests/test_step_cost.py tests/test_speculative_gpu.py > "$OUT/gpu_tests.log" 2>&1
tail -2 "$OUT/gpu_tests.log"; grep -E "^FAILED" "$OUT/gpu_tests.log" | head -5
timeout 100 python3 -m aioffload.cli bench prefill --synthetic llama3-8b --synthetic-dir /tmp/s --skip-kernels \
  --skip-hf --skip-offload --hybrid off --prompt-lens 8000 --decode-contexts 1000 > "$OUT/prefill.log" 2>&1
echo "prefill rc=$?"; grep -E "step cost" "$OUT/prefill.log" | head -2
grep -v "safetensors:\|loading weights\|model-0" "$OUT/prefill.log" | tail -8
