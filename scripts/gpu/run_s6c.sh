#!/usr/bin/env bash
# Fifth session, GPU call 6: the eager worker's start-up mixed steps. GPU tests of every eager worker kind
# (offloaded, hybrid, MoE, speculative) and of lookahead, then the compile probe on a fresh Triton cache.
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:/tmp/site OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
nvidia-smi -L; lscpu | grep -m1 "Model name"
timeout 240 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_mixed_warmup.py tests/test_gpu.py \
  tests/test_lookahead_gpu.py tests/test_moe_gpu.py tests/test_speculative_gpu.py tests/test_step_cost.py \
  tests/test_mixed_step.py > "$OUT/gpu_tests.log" 2>&1
tail -1 "$OUT/gpu_tests.log"; grep -E "^FAILED|^ERROR" "$OUT/gpu_tests.log" | head -8
TRITON_CACHE_DIR=$(mktemp -d) timeout 200 python3 scripts/gpu/probe_s6_compile.py --synthetic-dir /tmp/s 2>&1 \
  | grep -v "safetensors:\|loading weights\|model-0" | grep -E "warm-up|compiles|ITL|_kernel|ready" | tail -20
