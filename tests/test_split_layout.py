"""The split layout of an offloaded layer: every host share leaves one contiguous streamed range,
and host + GPU partials add up to the dense MLP for every split."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from aioffload.config import ModelConfig
from aioffload.model.layout import layer_layout
from aioffload.offload.split_layout import SplitWeights, fill_mlp, pick_chunk, split_layout
from aioffload.offload.split_mlp import host_down_columns, host_share, mlp_share, silu_mul_chunks

H, INTER = 64, 128


def cfg(inter: int = INTER) -> ModelConfig:
    return ModelConfig(
        architecture="LlamaForCausalLM", vocab_size=32, hidden_size=H, intermediate_size=inter, num_layers=1,
        num_heads=4, num_kv_heads=2, head_dim=16, rms_norm_eps=1e-5, rope_theta=1e4, max_position_embeddings=64,
        tie_word_embeddings=False, qkv_bias=True, qk_norm=True, checkpoint_dtype="float32",
    )  # fmt: skip


def test_pick_chunk_is_the_largest_divisor_up_to_128() -> None:
    assert pick_chunk(14336) == 128
    assert pick_chunk(768) == 128
    assert pick_chunk(704) == 88
    assert pick_chunk(100) == 100
    assert pick_chunk(131) == 1  # a prime above 128


@pytest.mark.parametrize("chunk", [16, 32, 128])
def test_streamed_range_is_contiguous_and_shrinks_by_one_chunk(chunk: int) -> None:
    sp = split_layout(layer_layout(cfg()), H, INTER, chunk)
    c = sp.num_chunks
    assert c == INTER // chunk
    ranges = [sp.streamed_range(k) for k in range(c + 1)]
    assert ranges[0] == (0, sp.numel)  # no host share: the whole layer streams
    lo_c, hi_c = ranges[c]
    assert (lo_c, hi_c) == (sp.attn_offset, sp.down_offset)  # all on the host: only attention streams
    for k in range(c):
        (lo, hi), (lo2, hi2) = ranges[k], ranges[k + 1]
        assert (lo2 - lo) + (hi - hi2) == sp.chunk_numel
    # The attention weights sit inside every streamed range.
    for p in sp.attn.params:
        assert all(lo <= p.offset and p.offset < hi for lo, hi in ranges)
    base = layer_layout(cfg())
    assert {p.name for p in sp.attn.params} == {p.name for p in base.params} - {"gate_up_w", "down_w"}


@pytest.mark.parametrize("chunk", [16, 32, 64])
def test_host_and_gpu_partials_add_up_to_the_dense_mlp(chunk: int) -> None:
    torch.manual_seed(0)
    sp = split_layout(layer_layout(cfg()), H, INTER, chunk)
    gate, up, down = torch.randn(INTER, H), torch.randn(INTER, H), torch.randn(H, INTER)
    flat = torch.full((sp.numel,), float("nan"))
    fill_mlp(sp, flat, gate, up, down)
    h = torch.randn(5, H, dtype=torch.float64).float()
    dense = F.linear(F.silu(F.linear(h, gate)) * F.linear(h, up), down)
    for k in range(sp.num_chunks + 1):
        w = SplitWeights(flat, sp, k, flat)  # the same buffer stands for slot and host here
        parts = []
        if k < sp.num_chunks:
            parts.append(mlp_share(h, w.gate_up, w.down_t, chunk))
        if k:
            down = host_down_columns(sp, flat, sp.num_chunks)[:, : k * chunk]  # the host's copy, a strided view
            parts.append(host_share(h, w.host_gate_up, down, chunk))
        total = sum(parts)
        assert torch.allclose(total, dense, rtol=1e-4, atol=1e-4), (k, (total - dense).abs().max())


def test_silu_mul_chunks_reverses_the_chunk_order() -> None:
    t, n, ch = 3, 4, 8
    gate_up = torch.randn(t, n * 2 * ch)
    out = silu_mul_chunks(gate_up, ch)
    y = gate_up.view(t, n, 2, ch)
    for c in range(n):
        expect = F.silu(y[:, c, 0]) * y[:, c, 1]
        assert torch.equal(out[:, (n - 1 - c) * ch : (n - c) * ch], expect)


def test_silu_mul_chunks_keeps_the_order_when_ascending() -> None:
    t, n, ch = 2, 3, 4
    gate_up = torch.randn(t, n * 2 * ch)
    y = gate_up.view(t, n, 2, ch)
    expect = torch.cat([F.silu(y[:, c, 0]) * y[:, c, 1] for c in range(n)], dim=1)
    assert torch.equal(silu_mul_chunks(gate_up, ch, descending=False), expect)


@pytest.mark.parametrize("k", [1, 2, 4])
def test_host_down_columns_are_the_down_matrix_first_columns(k: int) -> None:
    sp = split_layout(layer_layout(cfg()), H, INTER, 32)
    gate, up, down = torch.randn(INTER, H), torch.randn(INTER, H), torch.randn(H, INTER)
    flat = torch.zeros(sp.numel)
    fill_mlp(sp, flat, gate, up, down)
    cols = host_down_columns(sp, flat, k)
    assert cols.shape == (H, k * 32) and cols.is_contiguous()
    assert torch.equal(cols, down[:, : k * 32])
    assert cols.data_ptr() != flat.data_ptr()  # a copy: the pinned buffer keeps its split layout


def test_split_weights_views_cover_exactly_their_chunks() -> None:
    sp = split_layout(layer_layout(cfg()), H, INTER, 32)
    flat = torch.arange(sp.numel, dtype=torch.float64)
    w = SplitWeights(flat, sp, 1, flat)
    lo, hi = sp.streamed_range(1)
    assert w.gate_up.data_ptr() == flat[lo:].data_ptr()
    assert w.down_t.data_ptr() + w.down_t.numel() * 8 == flat[hi:].data_ptr()
    assert w.host_gate_up.shape == (2 * 32, H) and w.host_gate_up.data_ptr() == flat.data_ptr()
    assert w.qkv_w.shape == (16 * 4 + 2 * 16 * 2, H) and w.qkv_b is not None and w.q_norm is not None
