"""Tensor-parallel sharding without processes: which slice each rank holds, the one-line errors,
the rank's ModelConfig, reading row and column slices from safetensors, a layer's shards that
reassemble into the layer, and the vocabulary-parallel embedding, gather and argmax (over a
stand-in group that hands each rank's tensors to rank 0)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from aioffload.checkpoint.checkpoint import Checkpoint, read_layer_into
from aioffload.checkpoint.safetensors_io import read_header
from aioffload.checkpoint.shard_read import read_layer_shard_into, read_slice_into
from aioffload.config import ConfigError, ModelConfig, OffloadConfig
from aioffload.distributed.parallel_ops import ShardOps
from aioffload.distributed.sharding import (
    Slice,
    TPShard,
    check_tensor_parallel,
    local_model_config,
    rank_offload_config,
)
from aioffload.model.layout import LayerWeights, layer_layout
from tests.helpers import write_random_checkpoint


def cfg(heads: int = 8, kv: int = 4, inter: int = 768, vocab: int = 4096, d: int = 32) -> ModelConfig:
    return ModelConfig("LlamaForCausalLM", vocab, heads * d, inter, 2, heads, kv, d, 1e-5, 1e4, 512, False, False,
                       False, "float32")  # fmt: skip


def test_heads_units_and_vocabulary_split_evenly_in_rank_order():
    shards = [TPShard.of(cfg(), r, 2) for r in range(2)]
    assert [s.heads for s in shards] == [(0, 4), (4, 8)]
    assert [s.kv_heads for s in shards] == [(0, 2), (2, 4)]
    assert [s.intermediate for s in shards] == [(0, 384), (384, 768)]
    assert [s.vocab for s in shards] == [(0, 2048), (2048, 4096)]
    s1 = shards[1]
    assert s1.slice_of("model.layers.3.self_attn.q_proj.weight") == Slice(0, 128, 256)
    assert s1.slice_of("model.layers.3.self_attn.k_proj.bias") == Slice(0, 64, 128)
    assert s1.slice_of("model.layers.3.self_attn.o_proj.weight") == Slice(1, 128, 256)
    assert s1.slice_of("model.layers.0.mlp.up_proj.weight") == Slice(0, 384, 768)
    assert s1.slice_of("model.layers.0.mlp.down_proj.weight") == Slice(1, 384, 768)
    assert s1.slice_of("lm_head.weight") == Slice(0, 2048, 4096)
    for replicated in ("model.norm.weight", "model.layers.0.input_layernorm.weight",
                       "model.layers.0.self_attn.q_norm.weight"):  # fmt: skip
        assert s1.slice_of(replicated) is None


def test_fewer_kv_heads_than_ranks_are_shared_by_consecutive_ranks():
    """2 KV heads over 4 ranks: ranks 0-1 read KV head 0, ranks 2-3 KV head 1, each the head of its query heads."""
    shards = [TPShard.of(cfg(heads=8, kv=2), r, 4) for r in range(4)]
    assert [s.kv_heads for s in shards] == [(0, 1), (0, 1), (1, 2), (1, 2)]
    for s in shards:  # query head j reads KV head j // (8 / 2)
        lo, hi = s.heads
        assert {j // 4 for j in range(lo, hi)} == {s.kv_heads[0]}
    one = TPShard.of(cfg(heads=4, kv=1), 1, 2)
    assert one.kv_replicated and one.kv_heads == (0, 1)
    assert local_model_config(cfg(heads=4, kv=1), one).num_kv_heads == 1


def test_an_uneven_vocabulary_pads_the_last_shard():
    shards = [TPShard.of(cfg(vocab=10), r, 4) for r in range(4)]
    assert {s.vocab_rows for s in shards} == {3}
    assert [s.vocab for s in shards] == [(0, 3), (3, 6), (6, 9), (9, 10)]


def test_the_ranks_model_config_is_its_share():
    local = local_model_config(cfg(vocab=4097), TPShard.of(cfg(vocab=4097), 0, 2))
    assert (local.num_heads, local.num_kv_heads, local.intermediate_size, local.vocab_size) == (4, 2, 384, 2049)
    assert (local.head_dim, local.hidden_size, local.q_size, local.kv_size) == (32, 256, 128, 64)


@pytest.mark.parametrize(
    "model, size, hf, message",
    [
        (cfg(), 3, {}, "--tensor-parallel-size 3 does not divide the model's 8 attention heads"),
        (cfg(heads=12, kv=4), 6, {}, "--tensor-parallel-size 6: the model's 4 KV heads must be a multiple"),
        (cfg(inter=769), 2, {}, "--tensor-parallel-size 2 does not divide the model's MLP intermediate size 769"),
        (cfg(), 2, {"num_local_experts": 8}, "mixture-of-experts model (config.json sets num_local_experts)"),
        (cfg(), 2, {"num_experts": 60}, "tensor parallelism supports dense models only"),
    ],
)
def test_a_model_that_cannot_be_sharded_is_a_one_line_error(model: ModelConfig, size: int, hf: dict, message: str):
    with pytest.raises(ConfigError) as e:
        check_tensor_parallel(model, size, hf)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_shardable_models_pass_and_size_one_needs_nothing():
    check_tensor_parallel(cfg(), 2, {"num_experts": 0})  # a dense config may name the key with 0
    check_tensor_parallel(cfg(heads=8, kv=1), 8, {})
    check_tensor_parallel(cfg(inter=7), 1, {"num_experts": 4})


def test_cpu_offload_gb_counts_every_rank_together():
    assert rank_offload_config(OffloadConfig(cpu_offload_gb=10.0), 4).cpu_offload_gb == 2.5
    assert rank_offload_config(OffloadConfig(trigger=0.5), 4) == OffloadConfig(trigger=0.5)


def test_row_and_column_slices_read_from_the_file_equal_tensor_slicing(tmp_path: Path):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 10, generator=g)
    save_file({"w": w.to(torch.bfloat16), "x": w}, tmp_path / "t.safetensors")
    entries = read_header(tmp_path / "t.safetensors")
    for name in ("w", "x"):
        want = w.to(torch.bfloat16).float() if name == "w" else w
        rows, cols = torch.empty(2, 10), torch.empty(6, 3)  # float32: the bf16 entry converts
        read_slice_into(entries[name], rows, Slice(0, 3, 5))
        read_slice_into(entries[name], cols, Slice(1, 7, 10))
        assert torch.equal(rows, want[3:5]) and torch.equal(cols, want[:, 7:10])
        same = torch.empty(6 * 4, dtype=entries[name].dtype)  # the file's dtype: read in place, no copy
        read_slice_into(entries[name], same, Slice(1, 2, 6))
        assert torch.equal(same.float().view(6, 4), want[:, 2:6])


def test_a_layers_shards_reassemble_into_the_layer(tmp_path: Path):
    """Qwen3 shape (q/k norms), 4 heads / 2 KV heads over 2 ranks: the ranks' buffers, concatenated
    along each tensor's parallel dimension, are the whole layer's tensors."""
    path = write_random_checkpoint(tmp_path, layers=2, seed=4)
    ckpt = Checkpoint.open(path)
    m = ckpt.model_config
    full = torch.empty(ckpt.layout.numel)
    read_layer_into(ckpt, 1, full)
    whole = LayerWeights(full, ckpt.layout)
    parts = []
    for r in range(2):
        shard = TPShard.of(m, r, 2)
        layout = layer_layout(local_model_config(m, shard))
        flat = torch.full((layout.numel,), float("nan"))
        read_layer_shard_into(ckpt, 1, flat, layout, shard)
        assert not flat.isnan().any()  # every element written, the alignment gaps zeroed
        parts.append(LayerWeights(flat, layout))

    def qkv(w: LayerWeights, q: int, kv: int) -> tuple[torch.Tensor, ...]:
        return w.qkv_w[:q], w.qkv_w[q : q + kv], w.qkv_w[q + kv :]

    for j in range(3):  # q, k, v: rows by head
        got = torch.cat([qkv(p, m.q_size // 2, m.kv_size // 2)[j] for p in parts])
        assert torch.equal(got, qkv(whole, m.q_size, m.kv_size)[j])
    assert torch.equal(torch.cat([p.o_w for p in parts], dim=1), whole.o_w)
    i = m.intermediate_size
    gate = torch.cat([p.gate_up_w[: i // 2] for p in parts])
    up = torch.cat([p.gate_up_w[i // 2 :] for p in parts])
    assert torch.equal(gate, whole.gate_up_w[:i]) and torch.equal(up, whole.gate_up_w[i:])
    assert torch.equal(torch.cat([p.down_w for p in parts], dim=1), whole.down_w)
    for name in ("input_norm", "post_norm", "q_norm", "k_norm"):
        assert all(torch.equal(getattr(p, name), getattr(whole, name)) for p in parts)


class StandIn:
    """A group of `size` ranks inside one process: `gather` on rank 0 returns what the other ranks'
    ShardOps sent (`sent`), theirs record it; all_reduce_ leaves the partial for the test to sum."""

    def __init__(self, rank: int, size: int, sent: list[torch.Tensor]) -> None:
        self.rank, self.size, self.sent = rank, size, sent

    def gather(self, t: torch.Tensor) -> list[torch.Tensor] | None:
        if self.rank:
            self.sent.append(t.clone())
            return None
        return [t, *self.sent]

    def all_reduce_(self, t: torch.Tensor) -> torch.Tensor:
        return t


def ops_for(vocab: int, size: int, sent: list[torch.Tensor]) -> list[ShardOps]:
    return [ShardOps(StandIn(r, size, sent), TPShard.of(cfg(vocab=vocab), r, size)) for r in range(size)]  # type: ignore[arg-type]


def test_vocabulary_parallel_logits_and_argmax_reach_rank_zero():
    """V = 5 over 2 ranks (3 rows, the last padded): the padding column never shows, and among equal
    maxima the first index wins, as torch.argmax picks it."""
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0, 3.0], [5.0, 1.0, 1.0, 1.0, 2.0], [-1.0, -2.0, -3.0, -0.5, -4.0]])
    local = [logits[:, :3], torch.cat([logits[:, 3:], torch.full((3, 1), 99.0)], dim=1)]  # pad column: garbage
    for what in ("gather_logits", "argmax"):
        sent: list[torch.Tensor] = []
        r0, r1 = ops_for(5, 2, sent)
        assert getattr(r1, what)(local[1]) is None
        got = getattr(r0, what)(local[0])
        want = logits if what == "gather_logits" else logits.argmax(dim=-1)
        assert torch.equal(got, want), (what, got)
    assert torch.equal(logits.argmax(dim=-1), torch.tensor([1, 0, 3]))


def test_the_vocabulary_parallel_embedding_sums_to_the_table_lookup():
    table = torch.randn(5, 4, generator=torch.Generator().manual_seed(1))
    ids = torch.tensor([4, 0, 2, 3, 3])
    ops = ops_for(5, 2, [])
    shards = [torch.zeros(3, 4), torch.zeros(3, 4)]
    shards[0][:3], shards[1][:2] = table[:3], table[3:]
    partials = [o.embed(s, ids) for o, s in zip(ops, shards, strict=True)]
    assert torch.equal(partials[0] + partials[1], table[ids])
    assert torch.equal(partials[0][0], torch.zeros(4)) and torch.equal(partials[1][1], torch.zeros(4))
