#!/usr/bin/env bash
# Prepared in the seventh session, which was lent no GPU: issue 11's acceptance in one call on one
# machine. Carry .whl and .peer (cp -r ../shared/measure/llamacpp .peer/llamacpp first). The patched
# bundle was smoke-run on this CPU machine (run.sh --cpu, STEPS="lb_ngl9 bb_ngl9" NPL=1,8): both steps ran.
# 1. bench offload, the hybrid worker first in its process (--hybrid-order first, the default now),
#    otherwise the command of the sixth session's calls 2, 5 and 9;
# 2. llama.cpp on the same machine and placement (-ngl 9: output + 8 blocks on the GPU, 24 on the
#    host): llama-bench tg32 (batch 1) and llama-batched-bench at B = 1 and 8 (the bundle's batched
#    step is -ngl 8; a copy of its run.sh gains the same step at -ngl 9).
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:/tmp/site OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
T0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
nvidia-smi -L; lscpu | grep -m1 "Model name"; uptime
timeout 300 python3 -m aioffload.cli bench offload --synthetic llama3-8b --synthetic-dir /tmp/s --resident-layers 8 \
  --offload-prefetch 3 --batch-sizes 1,8,64,256 --steps 6 --warmup 4 --check-tokens 64 --check-prompts 4 \
  --skip-engine --skip-resident --skip-accelerate --max-num-seqs 256 --speculative off > "$OUT/hybrid.log" 2>&1
echo "bench offload rc=$? at $(( $(date +%s) - T0 )) s"
grep -v "safetensors:\|loading weights\|model-0" "$OUT/hybrid.log" | grep -E "host share|batch .*:|^decode|hybrid|greedy|floor|RSS" | tail -30
rm -rf /tmp/s  # the synthetic checkpoint: llama.cpp writes its own gguf
if [ -d .peer/llamacpp ]; then
  bash scripts/gpu/peer_llamacpp.sh "$OUT/llamacpp" $(( 590 - ($(date +%s) - T0) ))
  echo "llama.cpp done at $(( $(date +%s) - T0 )) s"
fi
echo "total $(( $(date +%s) - T0 )) s"
