#!/usr/bin/env bash
# Eighth session (BENCHMARKS.md), GPU call 4: the mixed warm-up test alone (call 3 ran it after the other
# files, whose kernels were compiled already), then bench prefill on the final code.
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:/tmp/site OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
nvidia-smi -L; lscpu | grep -m1 "Model name"
TRITON_CACHE_DIR=$(mktemp -d) timeout 90 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_mixed_warmup.py \
  > "$OUT/warmup_test.log" 2>&1
echo "warm-up test rc=$?"; tail -1 "$OUT/warmup_test.log"; grep -E "^E " "$OUT/warmup_test.log" | head -5
timeout 380 python3 -m aioffload.cli bench prefill --synthetic llama3-8b --synthetic-dir /tmp/s --skip-kernels \
  --hybrid off > "$OUT/prefill.log" 2>&1
echo "prefill rc=$?"
grep -E "nobody decoding|fresh chunk shapes|memory:|served decode|ITL p99" "$OUT/prefill.log" | head -12
grep -v "safetensors:\|loading weights\|model-0" "$OUT/prefill.log" | tail -34
