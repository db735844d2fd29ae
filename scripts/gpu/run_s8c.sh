#!/usr/bin/env bash
# Seventh session, GPU call 2 (issue 11): on one machine, the host-team probe, bench offload at
# batch 1 and 8 (hybrid worker first, 15 host threads), llama.cpp -ngl 9 (tg32 and batched B = 1, 8),
# then, if time is left, bench offload again with 13 host threads. Carry .whl and .peer.
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:/tmp/site OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
T0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
nvidia-smi -L; lscpu | grep -m1 "Model name"; uptime
timeout 100 python3 scripts/gpu/probe_s8_teams.py > "$OUT/teams.log" 2>&1
echo "probe rc=$? at $(( $(date +%s) - T0 )) s"; tail -16 "$OUT/teams.log"
bench() {  # host threads
  timeout 170 python3 -m aioffload.cli bench offload --synthetic llama3-8b --synthetic-dir /tmp/s --resident-layers 8 \
    --offload-prefetch 3 --batch-sizes 1,8 --steps 10 --warmup 4 --check-tokens 16 --check-prompts 2 \
    --host-threads $1 --skip-engine --skip-resident --skip-accelerate --max-num-seqs 256 --speculative off \
    > "$OUT/threads_$1.log" 2>&1
  echo "host threads $1: rc=$? at $(( $(date +%s) - T0 )) s"
  grep -E "^hybrid decode batch|^decode batch|batch    [18]:|host calibrated|copy floor [0-9]" "$OUT/threads_$1.log" | head -12
}
bench 15
rm -rf /tmp/llamacpp && cp -r .peer/llamacpp /tmp/llamacpp
python3 - /tmp/llamacpp/run.sh <<'PY'
import sys
p = sys.argv[1]
s = open(p).read()
step = '''        bb_ngl9)        run_step bb_ngl9 80 60 llama-batched-bench "${BB[@]}" -ngl 9 -lm none -c "$BB_CTX" \\
                                -b 2048 -ub 512 -npp "$NPP" -ntg "$NTG" -npl "$NPL" ;;
'''
anchor = "        # (a) 8 of 32 blocks + output on the GPU\n"
assert anchor in s
s = s.replace(anchor, step + anchor, 1)
s = s.replace('"bb_ngl8": "batched, ngl 8 (output + 7 blocks GPU), pinned",',
              '"bb_ngl8": "batched, ngl 8 (output + 7 blocks GPU), pinned",\n    "bb_ngl9": "batched, ngl 9 (output + 8 blocks GPU), pinned",')
s = s.replace('"## llama-batched-bench (-ngl 8)"', '"## llama-batched-bench (bb_ngl8: -ngl 8, bb_ngl9: -ngl 9)"')
open(p, "w").write(s)
PY
LEFT=$(( 560 - ($(date +%s) - T0) ))
echo "llama.cpp: ${LEFT} s left"
OUT=$OUT/llamacpp STEPS="lb_ngl9 bb_ngl9" NPL=1,8 BUDGET_S=$LEFT bash /tmp/llamacpp/run.sh > "$OUT/llamacpp.log" 2>&1
echo "llama.cpp rc=$? at $(( $(date +%s) - T0 )) s"; tail -3 "$OUT/llamacpp.log"
grep -E "^\| (lb_ngl9|1|8) " "$OUT/llamacpp/summary.md" 2>/dev/null | head -8
if (( $(date +%s) - T0 < 400 )); then bench 13; fi
echo "total $(( $(date +%s) - T0 )) s"
