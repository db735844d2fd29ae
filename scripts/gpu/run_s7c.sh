#!/usr/bin/env bash
# Sixth session, GPU call 7 (issue 11): old and new host kernel side by side on one machine, each in a
# fresh process (ab_hybrid.py); the new one then a second worker in its process, as bench offload builds it.
# Needs .ab/old (`git archive 4ef6b27 aioffload | tar -x -C .ab/old`) carried.
export PYTHONUNBUFFERED=1 OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
nvidia-smi -L; lscpu | grep -m1 "Model name"
for v in new old; do
  if [ $v = old ]; then P=$PWD/.ab/old:$PWD:/tmp/site; A=""; else P=$PWD:/tmp/site; A="--second"; fi
  PYTHONPATH=$P timeout 200 python3 scripts/gpu/ab_hybrid.py $v $A > "$OUT/ab_$v.log" 2>&1
  echo "$v rc=$?"; grep '^{"label"' "$OUT/ab_$v.log"
done
