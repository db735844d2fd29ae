#!/usr/bin/env bash
# Fourth session, GPU call 2: every GPU test (the fused rope decode, GEMV, argmax among them), then probe_s5b.
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:/tmp/site OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
nvidia-smi -L; lscpu | grep -m1 "Model name"
timeout 200 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py tests/test_paged_kernel.py \
  tests/test_prefill_kernel.py tests/test_speculative_gpu.py tests/test_step_cost.py tests/test_graph_inputs.py \
  tests/test_mixed_step.py tests/test_moe_gpu.py tests/test_dense_prefill.py tests/test_rope_decode.py \
  tests/test_gemv.py tests/test_argmax.py > "$OUT/gpu_tests.log" 2>&1
tail -3 "$OUT/gpu_tests.log"; grep -E "^FAILED|^ERROR" "$OUT/gpu_tests.log" | head -8
timeout 300 python3 scripts/gpu/probe_s5b.py --synthetic-dir /tmp/s 2>&1 | grep -v "safetensors:\|loading weights\|model-0" | tail -24
