#!/usr/bin/env bash
# GPU call: bench speculative (streamed offload, no host split), then the hybrid bench offload.
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
timeout 250 python3 -m aioffload.cli bench speculative --synthetic llama3-8b --synthetic-dir /tmp/s --hybrid off \
  --steps 6 > "$OUT/spec.log" 2>&1
echo "spec rc=$?"
grep -v "safetensors:\|loading weights\|model-0" "$OUT/spec.log" | tail -24
timeout 200 python3 -m aioffload.cli bench offload --synthetic llama3-8b --synthetic-dir /tmp/s --resident-layers 8 \
  --offload-prefetch 3 --batch-sizes 1,8,64,256 --steps 6 --warmup 4 --check-tokens 64 --check-prompts 4 \
  --skip-engine --skip-resident --skip-accelerate --max-num-seqs 256 --speculative off > "$OUT/hybrid.log" 2>&1
echo "hybrid rc=$?"
grep -v "safetensors:\|loading weights\|model-0" "$OUT/hybrid.log" | grep -E "host share|batch .*:|^decode|^hybrid|greedy|vs --hybrid" | tail -24
