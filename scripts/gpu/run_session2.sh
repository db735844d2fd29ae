#!/usr/bin/env bash
# GPU call (2026-12-01, second session): every GPU test, the batch-1 decode profile, bench prefill
# (the mixed graph+eager step, the do_not_specialize fix), bench speculative (fixed-point agreeing draft).
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:/tmp/site OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
nvidia-smi -L; lscpu | grep -m1 "Model name"
timeout 120 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py tests/test_paged_kernel.py \
  tests/test_prefill_kernel.py tests/test_speculative_gpu.py tests/test_step_cost.py tests/test_graph_inputs.py \
  tests/test_mixed_step.py tests/test_moe_gpu.py > "$OUT/gpu_tests.log" 2>&1
tail -3 "$OUT/gpu_tests.log"
timeout 120 python3 scripts/gpu/profile_decode.py --synthetic-dir /tmp/s > "$OUT/profile.log" 2>&1
echo "profile rc=$?"; tail -28 "$OUT/profile.log"
timeout 160 python3 -m aioffload.cli bench prefill --synthetic llama3-8b --synthetic-dir /tmp/s --skip-kernels \
  --hybrid off > "$OUT/prefill.log" 2>&1
echo "prefill rc=$?"
grep -v "safetensors:\|loading weights\|model-0" "$OUT/prefill.log" | tail -22
timeout 170 python3 -m aioffload.cli bench speculative --synthetic llama3-8b --synthetic-dir /tmp/s --hybrid off \
  --steps 6 > "$OUT/spec.log" 2>&1
echo "spec rc=$?"
grep -v "safetensors:\|loading weights\|model-0" "$OUT/spec.log" | tail -22
