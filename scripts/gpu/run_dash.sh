#!/usr/bin/env bash
# The dashboard's CPU step-time check on the GPU machine's quiet host (issue 17).
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:/tmp/site OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
OMP_NUM_THREADS=4 timeout 400 python3 scripts/dashboard_overhead.py --interleave 80 --window 2 --out "$OUT/dash.json" -- \
  --model aioffload/assets/demo --cpu-offload-gb 0.007 --device cpu > "$OUT/dash.log" 2>&1
echo "dash rc=$?"; tail -4 "$OUT/dash.log"
