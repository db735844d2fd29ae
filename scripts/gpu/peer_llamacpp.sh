#!/usr/bin/env bash
# llama.cpp beside us on the same machine and placement (issue 11): the shared bundle, copied into the
# ignored .peer/llamacpp (cp -r ../shared/measure/llamacpp .peer/llamacpp; carry .peer), with a batched
# step at -ngl 9 added to its run.sh (the bundle's batched step is -ngl 8). -ngl 9 puts the output layer
# and 8 blocks on the GPU, 24 blocks on the host, as our 24-layer offload. Runs llama-bench tg32
# (batch 1) and llama-batched-bench at B = 1 and 8.   Usage: peer_llamacpp.sh OUT_DIR BUDGET_S
set -uo pipefail
OUT_DIR=$1 BUDGET=$2
[ -f .peer/llamacpp/build.sh ] || { echo "no .peer/llamacpp/build.sh: copy the bundle and carry .peer"; exit 1; }
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
echo "llama.cpp: ${BUDGET} s budget"
OUT=$OUT_DIR STEPS="lb_ngl9 bb_ngl9" NPL=1,8 BUDGET_S=$BUDGET bash /tmp/llamacpp/run.sh > "$OUT_DIR.log" 2>&1
echo "llama.cpp rc=$?"
grep -E "^\| (lb_ngl9|1|8) " "$OUT_DIR/summary.md" 2>/dev/null | head -8
