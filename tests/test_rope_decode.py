"""Decode-only steps rope q and k and write the cache inside the decode attention launch
(attention/paged_kernel.py, "Rope"): the same values as the separate rope + cache kernel followed
by attention. The kernel runs under the Triton interpreter in a child process (tests/paged_cases.py);
`gpu` tests compare the compiled kernel in bfloat16."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from aioffload.attention.backends import SdpaBackend, TritonPagedBackend
from aioffload.model import ops
from aioffload.worker.inputs import SeqChunk, build_inputs
from tests.paged_cases import (
    CPU,
    INTERPRETED,
    TOL,
    gpu_only,
    interpreter,
    max_err,
    needs_interpreter,
    random_step,
    run_interpreter_child,
)

HKV = 2
STEP = [(n - 1, 1) for n in (1, 17, 64, 65, 300)]  # decode rows: contexts across the 64-key tiles


def rope_table(positions: int, head_dim: int, seed: int) -> torch.Tensor:
    """[P, 2, D] cos and sin with equal halves, as model/llama.py's rope_cache lays them out."""
    g = torch.Generator().manual_seed(seed)
    freqs = torch.rand(positions, head_dim // 2, generator=g) * 3
    emb = torch.cat([freqs, freqs], dim=-1)
    return torch.stack([emb.cos(), emb.sin()], dim=1)


def case(group: int, head_dim: int, block_size: int, dtype: torch.dtype, device: torch.device, seed: int):
    """A decode step with raw qkv rows; the reference (separate rope + cache write, then float32
    SDPA) and its caches; fresh caches for the fused call."""
    _, _, _, k_cache, v_cache, meta = random_step(STEP, block_size, HKV, group, head_dim, dtype, device, seed=seed)
    t, hq = meta.row_ctx.numel(), HKV * group
    g = torch.Generator().manual_seed(seed + 1)
    qkv = torch.randn(t, (hq + 2 * HKV) * head_dim, generator=g).to(dtype=dtype, device=device)
    positions = (meta.row_ctx - 1).long()
    rope = rope_table(400, head_dim, seed).to(dtype=dtype, device=device)
    kc, vc = k_cache.clone(), v_cache.clone()
    q = ops.rope_and_cache(qkv, positions, rope, meta.slot_mapping, kc, vc, hq, HKV, head_dim)
    ref = SdpaBackend().attend(q.float(), kc.float(), vc.float(), meta, head_dim**-0.5)
    return qkv, positions, rope, k_cache, v_cache, meta, ref, kc, vc


def fused(kernel, qkv, positions, rope, k_cache, v_cache, meta, head_dim, splits):
    q = kernel.rope_view(qkv, HKV, head_dim)
    return kernel.paged_attention(q, k_cache, v_cache, meta.block_tables, meta.row_seq, meta.row_ctx, head_dim**-0.5,
                                  splits=splits, rope=(positions, rope, meta.slot_mapping))  # fmt: skip


@pytest.fixture
def interpreted():
    from aioffload.attention import paged_kernel

    with interpreter():
        yield paged_kernel


CASES = [  # splits, group, head_dim, block_size, dtype
    (1, 4, 32, 16, torch.float32),
    (4, 1, 64, 16, torch.float32),
    (3, 8, 32, 4, torch.float16),
    (8, 4, 64, 32, torch.bfloat16),
]


@needs_interpreter
@pytest.mark.parametrize("splits, group, head_dim, block_size, dtype", CASES)
def test_interpreted_rope_decode_equals_separate_rope(interpreted, splits, group, head_dim, block_size, dtype):
    qkv, positions, rope, k_cache, v_cache, meta, ref, kc, vc = case(group, head_dim, block_size, dtype, CPU, 3)
    out = fused(interpreted, qkv, positions, rope, k_cache, v_cache, meta, head_dim, splits)
    assert out.shape == (len(STEP), HKV * group, head_dim) and out.dtype == dtype
    assert max_err(out, ref) < TOL[dtype], max_err(out, ref)
    # The new keys and values land in their slots (rounding apart); nothing else in the caches moves.
    slots = meta.slot_mapping
    flat = (k_cache.view(-1, HKV, head_dim), kc.view(-1, HKV, head_dim))
    # Half types: the CPU op rounds each product in the half type, the kernel once: an ulp apart.
    atol = {torch.float32: 1e-6, torch.float16: 4e-3, torch.bfloat16: 4e-2}[dtype]
    torch.testing.assert_close(flat[0][slots], flat[1][slots], rtol=1e-2, atol=atol)
    assert torch.equal(v_cache.view(-1, HKV, head_dim)[slots], vc.view(-1, HKV, head_dim)[slots])
    rest = torch.ones(flat[0].shape[0], dtype=torch.bool)
    rest[slots] = False
    assert torch.equal(flat[0][rest], flat[1][rest]) and torch.equal(v_cache, vc)


@pytest.fixture(scope="module")
def llama_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.tiny_models import make_checkpoint

    return make_checkpoint(tmp_path_factory.mktemp("ropedec"), "llama3", seed=2, layers=2)


@needs_interpreter
def test_interpreted_model_decode_step_is_the_same_fused_or_not(llama_path: Path) -> None:
    """The tiny Llama over the Triton backend: a decode step of three sequences gives the same logits
    and caches with the rope in the decode launch as with the separate rope kernel."""
    from aioffload.attention.kv_cache import KVCache
    from aioffload.checkpoint.checkpoint import Checkpoint
    from aioffload.worker.model_loader import build_model

    with interpreter():
        ckpt = Checkpoint.open(str(llama_path))
        cfg, backend = ckpt.model_config, TritonPagedBackend()
        model, _ = build_model(ckpt, torch.float32, CPU, backend, 256)
        prompts = [[(7 * j + s) % 200 + 3 for j in range(n)] for s, n in enumerate((20, 5, 40))]
        tables = [[4, 1], [6], [2, 7, 3]]
        caches = []
        for fuse in (False, True):
            backend.fuse_rope = fuse
            kv = KVCache(cfg.num_layers, 10, 16, cfg.num_kv_heads, cfg.head_dim, torch.float32, CPU)
            prefill = build_inputs([SeqChunk(p, 0, t) for p, t in zip(prompts, tables)], 16, CPU)
            model.forward(prefill.input_ids, prefill.positions, prefill.meta, kv)
            decodes = [SeqChunk([9 + s], len(p), t) for s, (p, t) in enumerate(zip(prompts, tables))]
            step = build_inputs(decodes, 16, CPU)
            assert step.meta.decode_only
            caches.append((model.forward(step.input_ids, step.positions, step.meta, kv), kv))
    (plain, kv_plain), (one_launch, kv_fused) = caches
    assert one_launch.shape == (3, cfg.vocab_size)
    torch.testing.assert_close(one_launch, plain, rtol=1e-5, atol=1e-5)
    for layer in range(cfg.num_layers):
        torch.testing.assert_close(kv_fused.k[layer], kv_plain.k[layer], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(kv_fused.v[layer], kv_plain.v[layer], rtol=1e-6, atol=1e-6)


def test_only_decode_only_steps_are_marked() -> None:
    decode = build_inputs([SeqChunk([5], 3, [1]), SeqChunk([6], 0, [2])], 16, CPU).meta
    prefill = build_inputs([SeqChunk([5], 3, [1]), SeqChunk([6, 7], 0, [2])], 16, CPU).meta
    verify = build_inputs([SeqChunk([5, 8], 3, [1], num_logits=2)], 16, CPU).meta
    assert decode.decode_only and decode.last_token_idx.tolist() == [0, 1]
    assert not prefill.decode_only and not verify.decode_only


def test_backends_without_the_fused_path_say_so() -> None:
    meta = build_inputs([SeqChunk([5], 3, [1])], 16, CPU).meta
    cache = torch.zeros(3, 16, 1, 8)
    assert SdpaBackend().rope_attend(torch.zeros(1, 24), torch.zeros(1, dtype=torch.long), torch.zeros(8, 2, 8),
                                     cache, cache, meta, 1.0) is None  # fmt: skip


@pytest.mark.skipif(INTERPRETED, reason="this is the child process")
def test_interpreter_cases() -> None:
    pytest.importorskip("triton", reason="triton is not importable; the decode kernel needs it")
    run_interpreter_child(__file__, len(CASES) + 1)


@pytest.mark.parametrize("splits", [1, 32])
@gpu_only
def test_cuda_rope_decode_equals_separate_rope_bf16(splits: int) -> None:
    from aioffload.attention import paged_kernel as compiled

    dev = torch.device("cuda")
    qkv, positions, rope, k_cache, v_cache, meta, ref, kc, vc = case(4, 128, 16, torch.bfloat16, dev, 5)
    out = fused(compiled, qkv, positions, rope, k_cache, v_cache, meta, 128, splits)
    torch.cuda.synchronize()
    assert max_err(out, ref) < 2e-2 and (out.float() - ref).abs().mean().item() < 2e-3
    torch.testing.assert_close(k_cache, kc)
    assert torch.equal(v_cache, vc)
