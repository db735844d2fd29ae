#!/usr/bin/env bash
# Fifth session, GPU call 7: the session's last commit. Every GPU test file, then bench prefill (every
# issue-14 figure in one run, the eager workers' start-up mixed steps and the rope kernel's one variant in).
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:/tmp/site OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
nvidia-smi -L; lscpu | grep -m1 "Model name"
timeout 260 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py tests/test_paged_kernel.py \
  tests/test_prefill_kernel.py tests/test_speculative_gpu.py tests/test_step_cost.py tests/test_graph_inputs.py \
  tests/test_mixed_step.py tests/test_dense_prefill.py tests/test_gemv.py tests/test_argmax.py tests/test_capture.py \
  tests/test_gemv_choice.py tests/test_moe_gpu.py tests/test_lookahead_gpu.py tests/test_mixed_warmup.py \
  > "$OUT/gpu_tests.log" 2>&1
tail -1 "$OUT/gpu_tests.log"; grep -E "^FAILED|^ERROR" "$OUT/gpu_tests.log" | head -8
timeout 330 python3 -m aioffload.cli bench prefill --synthetic llama3-8b --synthetic-dir /tmp/s --skip-kernels \
  --hybrid off > "$OUT/prefill.log" 2>&1
echo "prefill rc=$?"
grep -E "decode lookahead|warm-up: |served decode|ITL p99" "$OUT/prefill.log" | head -12
grep -v "safetensors:\|loading weights\|model-0" "$OUT/prefill.log" | tail -34
