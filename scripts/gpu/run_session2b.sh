#!/usr/bin/env bash
# GPU call (2026-12-01, second session, part 2): the mixed steps both ways (graph+eager, all eager)
# with the ITL under an 8k prefill; then the dashboard's CPU step-time check on this quiet host.
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:/tmp/site OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
timeout 220 python3 scripts/gpu/profile_decode.py --synthetic-dir /tmp/s --itl > "$OUT/profile.log" 2>&1
echo "profile rc=$?"; grep -E "^ITL|^mixed|^b16|^step_ms|^chunk|^by kind" "$OUT/profile.log"
OMP_NUM_THREADS=4 timeout 330 python3 scripts/dashboard_overhead.py --interleave 60 --window 2 --out "$OUT/dash.json" -- \
  --model aioffload/assets/demo --cpu-offload-gb 0.007 --device cpu > "$OUT/dash.log" 2>&1
echo "dash rc=$?"; tail -6 "$OUT/dash.log"
