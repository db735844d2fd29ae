#!/usr/bin/env bash
# Fourth session, GPU call 1: the probe (scripts/gpu/probe_s5.py).
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:/tmp/site OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
nvidia-smi -L; lscpu | grep -m1 "Model name"
timeout 420 python3 scripts/gpu/probe_s5.py --synthetic-dir /tmp/s 2>&1 | grep -v "safetensors:\|loading weights\|model-0" | tail -40
