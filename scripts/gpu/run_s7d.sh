#!/usr/bin/env bash
# Sixth session, GPU call 8 (issue 11): call 7 again with the synthetic checkpoint written and synced
# to disk first (its 16 GB of dirty pages may be flushing while the host computes), and a third process
# (new again) to see the order effect. Needs .ab/old carried.
export PYTHONUNBUFFERED=1 OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
nvidia-smi -L; lscpu | grep -m1 "Model name"
PYTHONPATH=$PWD:/tmp/site python3 -c "from aioffload.bench.synthetic import make_synthetic_checkpoint as m; m('/tmp/s/llama3-8b', 'llama3-8b')" 2>&1 | tail -1
grep -E "^(Dirty|Writeback):" /proc/meminfo | tr -s ' ' | tr '\n' ' '; echo
python3 -c "import os, time; t = time.time(); os.sync(); print(f'sync took {time.time() - t:.1f} s')"; grep -E "^(Dirty|Writeback):" /proc/meminfo | tr -s ' ' | tr '\n' ' '; echo
for v in new old new2; do
  if [ $v = old ]; then P=$PWD/.ab/old:$PWD:/tmp/site; else P=$PWD:/tmp/site; fi
  PYTHONPATH=$P timeout 150 python3 scripts/gpu/ab_hybrid.py $v > "$OUT/ab_$v.log" 2>&1
  echo "$v rc=$?"; grep '^{"label"' "$OUT/ab_$v.log" | python3 -c "
import sys, json
for l in sys.stdin:
    r = json.loads(l); print(r['label'], r['run'], 'b', r['batch'], r['p50_ms'], 'ms', r['ratio'], 'x', 'k', r['k_start'], '->', r['k_end'], 'f', r['factor'], 'cal', r['host_per_chunk_us_b1'], 'us', 'dirty', r['dirty_mb'], 'wb', r['writeback_mb'], 'load', r['load1'])"
done
