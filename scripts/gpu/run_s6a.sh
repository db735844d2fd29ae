#!/usr/bin/env bash
# Fifth session, GPU call 1: decode lookahead. GPU tests (the fed graph launches, the engine with lookahead
# auto against off, the paths sampling and graph replay share), then bench prefill with the served decode.
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:/tmp/site OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
nvidia-smi -L; lscpu | grep -m1 "Model name"
timeout 220 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_lookahead_gpu.py tests/test_gpu.py \
  tests/test_speculative_gpu.py tests/test_step_cost.py tests/test_graph_inputs.py tests/test_mixed_step.py \
  tests/test_argmax.py tests/test_capture.py tests/test_gemv_choice.py tests/test_moe_gpu.py \
  > "$OUT/gpu_tests.log" 2>&1
tail -2 "$OUT/gpu_tests.log"; grep -E "^FAILED|^ERROR" "$OUT/gpu_tests.log" | head -8
timeout 360 python3 -m aioffload.cli bench prefill --synthetic llama3-8b --synthetic-dir /tmp/s --skip-kernels \
  --hybrid off > "$OUT/prefill.log" 2>&1
echo "prefill rc=$?"
grep -E "one-row matmuls|CUDA graphs|decode lookahead|served decode" "$OUT/prefill.log" | head -10
grep -v "safetensors:\|loading weights\|model-0" "$OUT/prefill.log" | tail -30
