#!/usr/bin/env bash
# Seventh session, GPU call 3 (issue 11): the acceptance run on one machine: bench offload at batch
# 1, 8, 64 and 256 (hybrid worker first, the floor the best of 5 timings), llama.cpp -ngl 9 (tg32,
# batched B = 1, 8), then the GPU tests if time is left. Carry .whl and .peer.
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:/tmp/site OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
T0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
nvidia-smi -L; lscpu | grep -m1 "Model name"; uptime
timeout 220 python3 -m aioffload.cli bench offload --synthetic llama3-8b --synthetic-dir /tmp/s --resident-layers 8 \
  --offload-prefetch 3 --batch-sizes 1,8,64,256 --steps 6 --warmup 4 --check-tokens 64 --check-prompts 4 \
  --skip-engine --skip-resident --skip-accelerate --max-num-seqs 256 --speculative off > "$OUT/hybrid.log" 2>&1
echo "bench offload rc=$? at $(( $(date +%s) - T0 )) s"
grep -E "host calibrated|batch    1:|step cost|^pinned|greedy vs|RSS" "$OUT/hybrid.log" | head -12
grep -A30 "^figure" "$OUT/hybrid.log" | head -30
bash scripts/gpu/peer_llamacpp.sh "$OUT/llamacpp" $(( 540 - ($(date +%s) - T0) ))
echo "llama.cpp done at $(( $(date +%s) - T0 )) s"
LEFT=$(( 590 - ($(date +%s) - T0) ))
if (( LEFT > 60 )); then
  timeout $LEFT python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py tests/test_mixed_warmup.py > "$OUT/gpu_tests.log" 2>&1
  tail -1 "$OUT/gpu_tests.log"; grep -E "^FAILED|^ERROR" "$OUT/gpu_tests.log" | head -8
fi
echo "total $(( $(date +%s) - T0 )) s"
