"""Megatron sharding arithmetic: which rows or columns of each checkpoint tensor one rank holds.

Column-parallel (rows of the stored [out, in] matrix): q/k/v (by attention head, so rope and the
q/k norms stay per head) and gate/up (by intermediate unit). Row-parallel (columns): o and down,
whose partial outputs the ranks sum with one all-reduce each. Vocabulary-parallel: rows of the
embedding table and of lm_head. Norms are replicated. KV heads are sharded when there are at
least as many as ranks, else replicated: each group of N / Hkv consecutive ranks shares one KV
head, which is the KV head of every query head those ranks hold.

Pure arithmetic on a ModelConfig; nothing here touches torch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from aioffload.config import ConfigError, ModelConfig, OffloadConfig

# config.json keys that mark a mixture-of-experts model, whatever its family calls them.
MOE_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_intermediate_size", "num_experts_per_tok")


@dataclass(frozen=True)
class Slice:
    """Rows (dim 0) or columns (dim 1) [lo, hi) of a stored tensor."""

    dim: int
    lo: int
    hi: int


@dataclass(frozen=True)
class TPShard:
    """Rank `rank` of `size`: its share of a model with these global sizes."""

    rank: int
    size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int

    @classmethod
    def of(cls, cfg: ModelConfig, rank: int, size: int) -> TPShard:
        return cls(rank, size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size, cfg.vocab_size)

    @property
    def heads(self) -> tuple[int, int]:
        """Query heads [lo, hi)."""
        n = self.num_heads // self.size
        return self.rank * n, (self.rank + 1) * n

    @property
    def kv_replicated(self) -> bool:
        return self.num_kv_heads < self.size

    @property
    def kv_heads(self) -> tuple[int, int]:
        """KV heads [lo, hi): a 1/N share, or the one head this rank's query heads read."""
        if self.kv_replicated:
            h = self.rank // (self.size // self.num_kv_heads)
            return h, h + 1
        n = self.num_kv_heads // self.size
        return self.rank * n, (self.rank + 1) * n

    @property
    def intermediate(self) -> tuple[int, int]:
        n = self.intermediate_size // self.size
        return self.rank * n, (self.rank + 1) * n

    @property
    def vocab_rows(self) -> int:
        """Rows of every rank's vocabulary shard (the last one zero-padded up to it)."""
        return -(-self.vocab_size // self.size)

    @property
    def vocab(self) -> tuple[int, int]:
        """The real vocabulary rows [lo, hi) this rank holds (hi - lo <= vocab_rows)."""
        lo = min(self.vocab_size, self.rank * self.vocab_rows)
        return lo, min(self.vocab_size, lo + self.vocab_rows)

    def of_rank(self, rank: int) -> TPShard:
        return dataclasses.replace(self, rank=rank)

    def slice_of(self, name: str) -> Slice | None:
        """This rank's slice of checkpoint tensor `name`; None when every rank holds all of it."""
        d = self.head_dim
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            return Slice(0, *self.vocab)
        if name.endswith(("self_attn.q_proj.weight", "self_attn.q_proj.bias")):
            lo, hi = self.heads
            return Slice(0, lo * d, hi * d)
        if name.endswith(("self_attn.k_proj.weight", "self_attn.k_proj.bias", "self_attn.v_proj.weight",
                          "self_attn.v_proj.bias")):  # fmt: skip
            lo, hi = self.kv_heads
            return Slice(0, lo * d, hi * d)
        if name.endswith("self_attn.o_proj.weight"):
            lo, hi = self.heads
            return Slice(1, lo * d, hi * d)
        if name.endswith(("mlp.gate_proj.weight", "mlp.up_proj.weight")):
            return Slice(0, *self.intermediate)
        if name.endswith("mlp.down_proj.weight"):
            return Slice(1, *self.intermediate)
        return None


def check_tensor_parallel(cfg: ModelConfig, size: int, hf_config: Mapping[str, Any] | None = None) -> None:
    """Raise a one-line ConfigError when `size` ranks cannot shard this model."""
    if size == 1:
        return
    flag = f"--tensor-parallel-size {size}"
    moe = next((k for k in MOE_KEYS if (hf_config or {}).get(k)), None) or (
        "num_experts" if getattr(cfg, "num_experts", 0) else None
    )
    if moe is not None:
        raise ConfigError(
            f"{flag}: {cfg.architecture} is a mixture-of-experts model (config.json sets {moe}); tensor "
            "parallelism supports dense models only"
        )
    if cfg.num_heads % size:
        raise ConfigError(f"{flag} does not divide the model's {cfg.num_heads} attention heads")
    if cfg.num_kv_heads % size and size % cfg.num_kv_heads:
        raise ConfigError(
            f"{flag}: the model's {cfg.num_kv_heads} KV heads must be a multiple of the rank count or divide it"
        )
    if cfg.intermediate_size % size:
        raise ConfigError(f"{flag} does not divide the model's MLP intermediate size {cfg.intermediate_size}")


def local_model_config(cfg: ModelConfig, shard: TPShard) -> ModelConfig:
    """The model one rank computes: its heads, KV heads, MLP units and vocabulary rows. Placement,
    the layer layout and the KV cache read this, so each of them is per rank with no change."""
    kv_lo, kv_hi = shard.kv_heads
    return dataclasses.replace(
        cfg,
        num_heads=cfg.num_heads // shard.size,
        num_kv_heads=kv_hi - kv_lo,
        intermediate_size=cfg.intermediate_size // shard.size,
        vocab_size=shard.vocab_rows,
    )


def rank_offload_config(offload: OffloadConfig, size: int) -> OffloadConfig:
    """--cpu-offload-gb counts the model's bytes on the host, all ranks together: each rank keeps
    1/N of them. The trigger and --gpu-memory-gb already speak of one GPU."""
    if offload.cpu_offload_gb is None or size == 1:
        return offload
    return dataclasses.replace(offload, cpu_offload_gb=offload.cpu_offload_gb / size)
