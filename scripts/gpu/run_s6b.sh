#!/usr/bin/env bash
# Fifth session, GPU call 4: the lookahead GPU tests again, then bench prefill with the cold ITL round
# (every issue-14 figure in one run).
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:/tmp/site OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
nvidia-smi -L; lscpu | grep -m1 "Model name"
timeout 120 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_lookahead_gpu.py > "$OUT/gpu_tests.log" 2>&1
tail -1 "$OUT/gpu_tests.log"; grep -E "^FAILED|^ERROR" "$OUT/gpu_tests.log" | head -8
timeout 420 python3 -m aioffload.cli bench prefill --synthetic llama3-8b --synthetic-dir /tmp/s --skip-kernels \
  --hybrid off > "$OUT/prefill.log" 2>&1
echo "prefill rc=$?"
grep -E "decode lookahead|served decode|ITL p99" "$OUT/prefill.log" | head -12
grep -v "safetensors:\|loading weights\|model-0" "$OUT/prefill.log" | tail -34
