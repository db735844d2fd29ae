#!/usr/bin/env bash
# Seventh session, GPU call 2 (issue 11): on one machine, the host-team probe, bench offload at
# batch 1 and 8 (hybrid worker first, 15 host threads), llama.cpp -ngl 9 (tg32 and batched B = 1, 8),
# then, if time is left, bench offload again with 13 host threads. Carry .whl and .peer.
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:/tmp/site OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
T0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
nvidia-smi -L; lscpu | grep -m1 "Model name"; uptime
timeout 100 python3 scripts/gpu/probe_s8_teams.py > "$OUT/teams.log" 2>&1
echo "probe rc=$? at $(( $(date +%s) - T0 )) s"; tail -16 "$OUT/teams.log"
bench() {  # host threads
  timeout 170 python3 -m aioffload.cli bench offload --synthetic llama3-8b --synthetic-dir /tmp/s --resident-layers 8 \
    --offload-prefetch 3 --batch-sizes 1,8 --steps 10 --warmup 4 --check-tokens 16 --check-prompts 2 \
    --host-threads $1 --skip-engine --skip-resident --skip-accelerate --max-num-seqs 256 --speculative off \
    > "$OUT/threads_$1.log" 2>&1
  echo "host threads $1: rc=$? at $(( $(date +%s) - T0 )) s"
  grep -E "^hybrid decode batch|^decode batch|batch    [18]:|host calibrated|copy floor [0-9]" "$OUT/threads_$1.log" | head -12
}
bench 15
bash scripts/gpu/peer_llamacpp.sh "$OUT/llamacpp" $(( 560 - ($(date +%s) - T0) ))
echo "llama.cpp done at $(( $(date +%s) - T0 )) s"
if (( $(date +%s) - T0 < 400 )); then bench 13; fi
echo "total $(( $(date +%s) - T0 )) s"
