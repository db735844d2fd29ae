#!/usr/bin/env bash
# GPU call 5 (2026-12-01, third session): the hybrid bench offload (issue 11) on today's code
# (the once-a-step split chooser of the second session's review ran on the CPU only).
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:/tmp/site OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
nvidia-smi -L; lscpu | grep -m1 "Model name"
timeout 280 python3 -m aioffload.cli bench offload --synthetic llama3-8b --synthetic-dir /tmp/s --resident-layers 8 \
  --offload-prefetch 3 --batch-sizes 1,8,64,256 --steps 6 --warmup 4 --check-tokens 64 --check-prompts 4 \
  --skip-engine --skip-resident --skip-accelerate --max-num-seqs 256 --speculative off > "$OUT/hybrid.log" 2>&1
echo "hybrid rc=$?"
grep -v "safetensors:\|loading weights\|model-0" "$OUT/hybrid.log" | grep -E "host share|batch .*:|^decode|^hybrid|greedy|vs --hybrid|floor" | tail -30
