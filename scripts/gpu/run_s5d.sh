#!/usr/bin/env bash
# Fourth session, GPU call 4: the review commit: GPU tests, argmax in a graph, bench prefill, then the host turn profile.
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:/tmp/site OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
nvidia-smi -L; lscpu | grep -m1 "Model name"
timeout 200 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py tests/test_paged_kernel.py \
  tests/test_prefill_kernel.py tests/test_speculative_gpu.py tests/test_step_cost.py tests/test_graph_inputs.py \
  tests/test_mixed_step.py tests/test_dense_prefill.py tests/test_gemv.py tests/test_argmax.py \
  tests/test_capture.py tests/test_gemv_choice.py tests/test_moe_gpu.py > "$OUT/gpu_tests.log" 2>&1
tail -2 "$OUT/gpu_tests.log"; grep -E "^FAILED|^ERROR" "$OUT/gpu_tests.log" | head -8
python3 - <<'PY'
import torch
from aioffload.worker.argmax import argmax_rows
x = torch.randn(1, 128256, device="cuda")
for name, fn in (("torch", lambda: x.argmax(dim=-1)), ("ours", lambda: argmax_rows(x))):
    s = torch.cuda.Stream(); s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(50):
            fn()
    g.replay(); torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record(); g.replay(); b.record(); b.synchronize()
    print(f"argmax {name}: {a.elapsed_time(b) * 1e3 / 50:.1f} us a call (GPU, in a graph)")
PY
timeout 330 python3 -m aioffload.cli bench prefill --synthetic llama3-8b --synthetic-dir /tmp/s --skip-kernels \
  --hybrid off > "$OUT/prefill.log" 2>&1
echo "prefill rc=$?"
grep -E "one-row matmuls|CUDA graphs|prefill attention|step cost|chunk graph of" "$OUT/prefill.log" | head -8
grep -v "safetensors:\|loading weights\|model-0" "$OUT/prefill.log" | tail -26
timeout 120 python3 scripts/gpu/profile_host_turn.py --synthetic-dir /tmp/s 2>&1 | grep -v "safetensors:\|loading weights\|model-0" | tail -34
