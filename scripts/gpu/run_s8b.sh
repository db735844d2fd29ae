#!/usr/bin/env bash
# Prepared in the seventh session (no GPU lent): the host-team probe, then the GPU tests of the split
# (the down copies now hold every chunk that fits: test_gpu.py's hybrid cases build them). Carry .whl.
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:/tmp/site OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
nvidia-smi -L; lscpu | grep -m1 "Model name"; uptime
timeout 150 python3 scripts/gpu/probe_s8_teams.py > "$OUT/teams.log" 2>&1
echo "probe rc=$?"; tail -16 "$OUT/teams.log"
timeout 200 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py tests/test_mixed_warmup.py > "$OUT/gpu_tests.log" 2>&1
tail -1 "$OUT/gpu_tests.log"; grep -E "^FAILED|^ERROR" "$OUT/gpu_tests.log" | head -8
