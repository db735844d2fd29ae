#!/usr/bin/env bash
# GPU call 4 (2026-12-01, third session): every GPU test, then bench prefill (prefill key splits).
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:/tmp/site OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
nvidia-smi -L; lscpu | grep -m1 "Model name"
timeout 170 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py tests/test_paged_kernel.py \
  tests/test_prefill_kernel.py tests/test_speculative_gpu.py tests/test_step_cost.py tests/test_graph_inputs.py \
  tests/test_mixed_step.py tests/test_moe_gpu.py tests/test_dense_prefill.py > "$OUT/gpu_tests.log" 2>&1
tail -3 "$OUT/gpu_tests.log"; grep -E "^FAILED|^ERROR" "$OUT/gpu_tests.log" | head -8
timeout 250 python3 -m aioffload.cli bench prefill --synthetic llama3-8b --synthetic-dir /tmp/s --skip-kernels \
  --hybrid off > "$OUT/prefill.log" 2>&1
echo "prefill rc=$?"
grep -E "CUDA graphs|prefill attention|step cost|chunk graph of" "$OUT/prefill.log" | head -8
grep -v "safetensors:\|loading weights\|model-0" "$OUT/prefill.log" | tail -22
