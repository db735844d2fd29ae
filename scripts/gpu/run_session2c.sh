#!/usr/bin/env bash
# GPU call (2026-12-01, second session, part 4): chunk graphs. Every GPU test, then bench prefill.
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:/tmp/site OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py tests/test_paged_kernel.py \
  tests/test_prefill_kernel.py tests/test_speculative_gpu.py tests/test_step_cost.py tests/test_graph_inputs.py \
  tests/test_mixed_step.py tests/test_chunk_graphs.py tests/test_moe_gpu.py > "$OUT/gpu_tests.log" 2>&1
tail -3 "$OUT/gpu_tests.log"; grep -E "^FAILED|Error" "$OUT/gpu_tests.log" | head -8
timeout 200 python3 -m aioffload.cli bench prefill --synthetic llama3-8b --synthetic-dir /tmp/s --skip-kernels \
  --hybrid off > "$OUT/prefill.log" 2>&1
echo "prefill rc=$?"
grep -E "chunk graphs|step cost" "$OUT/prefill.log" | head -3
grep -v "safetensors:\|loading weights\|model-0" "$OUT/prefill.log" | tail -22
