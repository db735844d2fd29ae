#!/usr/bin/env bash
# GPU call: MoE GPU tests and bench, then a dashboard recording while the offloaded 8B serves a load.
export PYTHONUNBUFFERED=1 OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD
timeout 80 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_moe_gpu.py > "$OUT/moe_tests.log" 2>&1
tail -3 "$OUT/moe_tests.log"
timeout 210 python3 -m aioffload.cli bench offload --synthetic qwen3-30b-a3b --synthetic-dir /tmp/m > "$OUT/moe.log" 2>&1
echo "moe rc=$?"; grep -v "safetensors:\|loading weights\|model-0" "$OUT/moe.log" | tail -26
rm -rf /tmp/m
U=http://127.0.0.1:8000
python3 -c "from aioffload.bench.synthetic import make_synthetic_checkpoint as m; m('/tmp/s/llama3-8b')" > /dev/null
python3 -m aioffload.cli serve --model /tmp/s/llama3-8b --gpu-memory-gb 24 --trigger 0.29658 --offload-prefetch 3 \
  --max-num-seqs 64 --port 8000 > "$OUT/serve.log" 2>&1 & S=$!
for i in $(seq 120); do python3 -c "import urllib.request as u; u.urlopen('$U/health', timeout=2)" 2>/dev/null && break; sleep 1; done
python3 scripts/record_dashboard.py $U 62 "$OUT/dashboard-8b.jsonl" > "$OUT/record.txt" 2>&1 & R=$!
timeout 70 python3 scripts/gpu/load_for_dashboard.py $U 48 55 > "$OUT/load.txt" 2>&1
wait $R; kill -TERM $S; wait $S
cat "$OUT/load.txt"; wc -l "$OUT/dashboard-8b.jsonl"; grep -E "hybrid: on|speculative|placement:" "$OUT/serve.log" | head -4
