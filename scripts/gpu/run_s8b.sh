#!/usr/bin/env bash
# Prepared in the seventh session (no GPU lent), for after run_s8.sh: the host-team probe, then
# bench offload at batch 1 and 8 with 15 and 13 host threads (the hybrid worker first each time;
# the second run reuses the synced checkpoint), then the GPU tests of the split. Carry .whl.
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:/tmp/site OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
T0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
nvidia-smi -L; lscpu | grep -m1 "Model name"; uptime
timeout 120 python3 scripts/gpu/probe_s8_teams.py > "$OUT/teams.log" 2>&1
echo "probe rc=$? at $(( $(date +%s) - T0 )) s"; tail -16 "$OUT/teams.log"
for t in 15 13; do
  timeout 170 python3 -m aioffload.cli bench offload --synthetic llama3-8b --synthetic-dir /tmp/s --resident-layers 8 \
    --offload-prefetch 3 --batch-sizes 1,8 --steps 10 --warmup 4 --check-tokens 16 --check-prompts 2 \
    --host-threads $t --skip-engine --skip-resident --skip-accelerate --max-num-seqs 256 --speculative off \
    > "$OUT/threads_$t.log" 2>&1
  echo "host threads $t: rc=$? at $(( $(date +%s) - T0 )) s"
  grep -E "^hybrid decode batch|calibrated|host shares of at most" "$OUT/threads_$t.log" | head -8
done
timeout 200 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py tests/test_mixed_warmup.py > "$OUT/gpu_tests.log" 2>&1
tail -1 "$OUT/gpu_tests.log"; grep -E "^FAILED|^ERROR" "$OUT/gpu_tests.log" | head -8
echo "total $(( $(date +%s) - T0 )) s"
