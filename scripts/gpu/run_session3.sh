#!/usr/bin/env bash
# GPU call 2 (2026-12-01, third session): every GPU test, the 32k probe (cuDNN chunks, tile kernel at
# 4 warps, decode kernels), then bench prefill (mixed graphs for the ITL run).
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:/tmp/site OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
nvidia-smi -L; lscpu | grep -m1 "Model name"
timeout 170 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py tests/test_paged_kernel.py \
  tests/test_prefill_kernel.py tests/test_speculative_gpu.py tests/test_step_cost.py tests/test_graph_inputs.py \
  tests/test_mixed_step.py tests/test_moe_gpu.py tests/test_dense_prefill.py > "$OUT/gpu_tests.log" 2>&1
tail -3 "$OUT/gpu_tests.log"; grep -E "^FAILED|^ERROR" "$OUT/gpu_tests.log" | head -8
timeout 150 python3 scripts/gpu/probe_long.py --synthetic-dir /tmp/s > "$OUT/probe.log" 2>&1
echo "probe rc=$?"; grep -E "^B:|^C:|^decode|^dense|sdpa cudnn gqa|ours m128 n64 w4|ours m128 n64 w8 s3|error" "$OUT/probe.log" | head -24
timeout 250 python3 -m aioffload.cli bench prefill --synthetic llama3-8b --synthetic-dir /tmp/s --skip-kernels \
  --hybrid off > "$OUT/prefill.log" 2>&1
echo "prefill rc=$?"
grep -E "CUDA graphs|prefill attention|step cost" "$OUT/prefill.log" | head -5
grep -v "safetensors:\|loading weights\|model-0" "$OUT/prefill.log" | tail -22
