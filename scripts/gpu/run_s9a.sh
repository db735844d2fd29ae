#!/usr/bin/env bash
# Ninth session, GPU call 1: the lone 32k prompt in one chunk (scripts/gpu/probe_s9_32k.py).
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:/tmp/site OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
nvidia-smi -L; lscpu | grep -m1 "Model name"
timeout 400 python3 scripts/gpu/probe_s9_32k.py --synthetic-dir /tmp/s > "$OUT/probe.log" 2>&1
echo "probe rc=$?"
grep -E "placement|cuDNN|KV cache|memory:" "$OUT/probe.log" | head -8
tail -45 "$OUT/probe.log"
