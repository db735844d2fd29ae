#!/usr/bin/env bash
# Sixth session, GPU call 2 (issue 11): the host reads its share's down projection from [H, K] copies.
# The probe with today's host_share (a strided view of a 70-chunk copy), the hybrid bench offload
# (hybrid run 5: the same command as run 4), then the GPU tests of the split.
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:/tmp/site OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
nvidia-smi -L; lscpu | grep -m1 "Model name"
timeout 120 python3 scripts/gpu/probe_s7_host.py > "$OUT/probe.log" 2>&1
echo "probe rc=$?"; grep -v "onednn_verbose" "$OUT/probe.log" | tail -13
timeout 280 python3 -m aioffload.cli bench offload --synthetic llama3-8b --synthetic-dir /tmp/s --resident-layers 8 \
  --offload-prefetch 3 --batch-sizes 1,8,64,256 --steps 6 --warmup 4 --check-tokens 64 --check-prompts 4 \
  --skip-engine --skip-resident --skip-accelerate --max-num-seqs 256 --speculative off > "$OUT/hybrid.log" 2>&1
echo "hybrid rc=$?"
grep -v "safetensors:\|loading weights\|model-0" "$OUT/hybrid.log" | grep -E "host share|batch .*:|^decode|hybrid|greedy|floor|down col" | tail -32
timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py tests/test_mixed_warmup.py > "$OUT/gpu_tests.log" 2>&1
tail -1 "$OUT/gpu_tests.log"; grep -E "^FAILED|^ERROR" "$OUT/gpu_tests.log" | head -8
