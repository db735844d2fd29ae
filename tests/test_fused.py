"""The fused CUDA-path kernels, run on the CPU under Triton's interpreter.

The interpreter is chosen when Triton kernels are defined, so these checks run in a
subprocess with TRITON_INTERPRET=1 (the rest of the suite must keep compiled Triton
for the real GPU run). The same kernels run compiled on the GPU in tests/test_gpu.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="Triton is not installed (pip install triton to run the interpreter checks)")

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent(
    """
    import json, sys, torch
    import torch.nn.functional as F
    from triton.runtime import interpreter as _ti
    _orig = _ti._patch_lang_tensor
    def _patch(tensor, scope):  # numpy >= 2.4 vs Triton 3.6's interpreter (triton-lang/triton#9171)
        _orig(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))
    _ti._patch_lang_tensor = _patch
    torch.set_num_threads(1)
    from aioffload.model import fused
    from aioffload.model.llama import rope_cache
    from aioffload.model.ops import apply_rope, rms_norm
    from tests.tiny_models import make_checkpoint
    torch.manual_seed(0)
    res = {}
    for dt in (torch.float32, torch.float16):
        x = torch.randn(5, 96, dtype=dt); r = torch.randn(5, 96, dtype=dt); w = torch.rand(96, dtype=dt) + 0.5
        want_sum = x + r
        want = rms_norm(want_sum, w, 1e-5)
        got = fused.add_rms_norm(x, r, w, 1e-5)
        res[f"add_rms_norm_{dt}"] = [(x - want_sum).abs().max().item(), (got - want).float().abs().max().item()]
        y = torch.randn(3, 96, dtype=dt)
        res[f"rms_norm_{dt}"] = (fused.add_rms_norm(y.clone(), None, w, 1e-5) - rms_norm(y, w, 1e-5)).float().abs().max().item()
        gu = torch.randn(4, 2 * 80, dtype=dt)
        g, u = gu.chunk(2, -1)
        res[f"silu_mul_{dt}"] = (fused.silu_mul(gu) - F.silu(g) * u).float().abs().max().item()
    # rope + cache write, with and without q/k norm
    from aioffload.config import ModelConfig
    for qk, t in ((False, 6), (True, 6), (False, 70), (True, 70)):  # 70 rows: 16-token programs and a tail
        hq, hkv, d = 4, 2, 16
        cfg = ModelConfig("LlamaForCausalLM", 32, 64, 64, 1, hq, hkv, d, 1e-6, 10000.0, 64, False, False, qk, "float32")
        rope = rope_cache(cfg, 64, torch.float32, torch.device("cpu"))
        qkv = torch.randn(t, (hq + 2 * hkv) * d)
        pos = torch.tensor([0, 3, 7, 8, 20, 63]) if t == 6 else torch.randint(0, 64, (t,))
        slots = torch.tensor([5, 0, 9, 2, 7, 11]) if t == 6 else torch.randperm(80)[:t]
        kc = torch.zeros(20, 4, hkv, d); vc = torch.zeros(20, 4, hkv, d)
        key = f"{qk}_{t}"
        qn = torch.rand(d) + 0.5 if qk else None; kn = torch.rand(d) + 0.5 if qk else None
        q = fused.rope_and_cache(qkv, pos, rope, slots, kc, vc, hq, hkv, d, qn, kn, 1e-6)
        rq, rk, rv = qkv.split([hq * d, hkv * d, hkv * d], -1)
        rq = rq.view(t, hq, d); rk = rk.view(t, hkv, d); rv = rv.view(t, hkv, d)
        if qk:
            rq = rms_norm(rq, qn, 1e-6); rk = rms_norm(rk, kn, 1e-6)
        cs = rope[pos]; cos, sin = cs[:, 0:1], cs[:, 1:2]
        rq, rk = apply_rope(rq, cos, sin), apply_rope(rk, cos, sin)
        res[f"rope_q_{key}"] = (q - rq).abs().max().item()
        res[f"rope_k_{key}"] = (kc.view(-1, hkv, d)[slots] - rk).abs().max().item()
        res[f"rope_v_{key}"] = (vc.view(-1, hkv, d)[slots] - rv).abs().max().item()
    # the whole fused forward (Triton attention + fused ops) against the CPU SDPA path
    from aioffload.attention.backends import SdpaBackend, TritonPagedBackend
    from aioffload.worker.inputs import SeqChunk, build_inputs
    from aioffload.attention.kv_cache import BlockManager, BlockPool, KVCache
    from aioffload.worker.model_loader import build_model
    from aioffload.checkpoint.checkpoint import Checkpoint
    from pathlib import Path
    for arch in ("llama3", "qwen3", "qwen2"):
        ck = Checkpoint.open(make_checkpoint(Path(sys.argv[1]), arch, tie=arch == "qwen2"))
        c = ck.model_config
        outs = []
        for backend, use_fused in ((SdpaBackend(), False), (TritonPagedBackend(), True)):
            model, _ = build_model(ck, torch.float32, torch.device("cpu"), backend, 128)
            if use_fused:
                model.ops = fused
            bm = BlockManager(BlockPool(32, 4)); kv = KVCache(c.num_layers, 32, 4, c.num_kv_heads, c.head_dim, torch.float32, "cpu")
            seqs = [[1, 5, 9, 33, 7, 100, 3], [1, 200, 201]]
            for i, s in enumerate(seqs):
                bm.allocate_slots(i, len(s) + 1)
            inp = build_inputs([SeqChunk(s, 0, bm.block_table(i)) for i, s in enumerate(seqs)], 4, torch.device("cpu"))
            a = model.forward(inp.input_ids, inp.positions, inp.meta, kv)
            inp = build_inputs([SeqChunk([7], len(s), bm.block_table(i)) for i, s in enumerate(seqs)], 4, torch.device("cpu"))
            b = model.forward(inp.input_ids, inp.positions, inp.meta, kv)
            outs.append(torch.cat([a, b]))
        res[f"model_{arch}"] = (outs[0] - outs[1]).abs().max().item()
    print(json.dumps(res))
    """
)


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path_factory.mktemp("fused"))],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_add_rms_norm_matches_torch(results: dict) -> None:
    for dt, tol in (("torch.float32", 1e-5), ("torch.float16", 2e-3)):
        residual_err, norm_err = results[f"add_rms_norm_{dt}"]
        assert residual_err == 0.0 and norm_err < tol, (dt, residual_err, norm_err)
        assert results[f"rms_norm_{dt}"] < tol


def test_silu_mul_matches_torch(results: dict) -> None:
    assert results["silu_mul_torch.float32"] < 1e-5
    assert results["silu_mul_torch.float16"] < 4e-3


@pytest.mark.parametrize("tokens", [6, 70])
@pytest.mark.parametrize("qk_norm", [False, True])
def test_rope_and_cache_write_match_torch(results: dict, qk_norm: bool, tokens: int) -> None:
    assert results[f"rope_q_{qk_norm}_{tokens}"] < 1e-5
    assert results[f"rope_k_{qk_norm}_{tokens}"] < 1e-5
    assert results[f"rope_v_{qk_norm}_{tokens}"] == 0.0


@pytest.mark.parametrize("arch", ["llama3", "qwen3", "qwen2"])
def test_fused_forward_matches_sdpa_path(results: dict, arch: str) -> None:
    assert results[f"model_{arch}"] < 1e-4, json.dumps(results)
