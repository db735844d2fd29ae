"""One decoder for the Llama family: Llama 2/3 (GQA, llama3 rope scaling), Mistral,
Qwen2 (qkv bias) and Qwen3 (q/k RMSNorm); tied embeddings.

The forward pass takes a flat batch of T tokens from S sequences (each a prefill chunk
or one decode token) and returns logits for the rows `meta.last_token_idx` names: the last token
of each sequence, or its last k + 1 when it ends in k proposed tokens to verify.
Layer weights come from a `LayerSource`: resident layers hand out their views, the
transfer queue hands out staging slots; the model does not know which is which.

Under tensor parallelism (`parallel`, DESIGN.md section 10) `cfg` is one rank's share (its heads,
MLP units and vocabulary rows) and the outputs of o and down are summed over the ranks; the
logits returned are then the rank's vocabulary columns.
"""

from __future__ import annotations

import math
import types
from typing import Protocol

import torch

from aioffload.attention.backends import AttentionBackend, AttentionMetadata
from aioffload.attention.kv_cache import KVCache
from aioffload.config import ModelConfig
from aioffload.distributed.parallel_ops import ShardOps
from aioffload.model import ops
from aioffload.model.layout import LayerWeights


class LayerSource(Protocol):
    """Hands out layer i's weights for the duration of its compute."""

    def acquire(self, layer: int) -> LayerWeights: ...

    def release(self, layer: int) -> None: ...


class Mlp(Protocol):
    """Computes layer i's MLP output from its post-attention input. The dense default is
    below; offloaded layers split between host and GPU, and MoE layers, plug in here."""

    def __call__(self, layer: int, h: torch.Tensor, w: LayerWeights) -> torch.Tensor: ...  # [T, H] -> [T, H]


class DenseMlp:
    """down(silu(gate(h)) * up(h)), with the ops module's fused SiLU x up."""

    def __init__(self, ops: types.ModuleType) -> None:
        self.ops = ops

    def __call__(self, layer: int, h: torch.Tensor, w: LayerWeights) -> torch.Tensor:
        return self.ops.linear(self.ops.silu_mul(self.ops.linear(h, w.gate_up_w)), w.down_w)  # [T, H]


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    d = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    scaling = cfg.rope_scaling_dict
    if not scaling:
        return inv_freq
    kind = scaling.get("rope_type", scaling.get("type"))
    factor = float(scaling["factor"])
    if kind == "linear":
        return inv_freq / factor
    # llama3: long wavelengths divided by factor, short kept, smooth blend in between.
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    old_len = float(scaling["original_max_position_embeddings"])
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def rope_cache(cfg: ModelConfig, max_positions: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """[max_positions, 2, head_dim]: cos and sin per position, as HF computes them."""
    inv_freq = rope_inv_freq(cfg)
    freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)
    return torch.stack([emb.cos(), emb.sin()], dim=1).to(dtype=dtype, device=device)


class LlamaModel:
    """Weights-agnostic decoder. `embed`, `final_norm`, `lm_head` are device tensors
    (embed may stay on the host: only the gathered rows are copied)."""

    def __init__(
        self,
        cfg: ModelConfig,
        embed: torch.Tensor,  # [V, H]
        final_norm: torch.Tensor,  # [H]
        lm_head: torch.Tensor,  # [V, H] (the embedding itself when tied and resident)
        layers: LayerSource,
        attention: AttentionBackend,
        max_positions: int,
        device: torch.device,
        mlp: Mlp | None = None,
        parallel: ShardOps | None = None,
    ) -> None:
        self.cfg = cfg
        self.embed = embed
        self.final_norm = final_norm
        self.lm_head = lm_head
        self.layers = layers
        self.attention = attention
        self.device = device
        self.dtype = final_norm.dtype
        self.rope = rope_cache(cfg, max_positions, self.dtype, device)
        self.scale = cfg.head_dim**-0.5
        # The elementwise ops between the matmuls: Triton kernels on CUDA with the Triton
        # attention backend, HF-exact PyTorch elsewhere; the same layer structure either way.
        self.ops: types.ModuleType = ops
        if device.type == "cuda" and attention.name == "torch":
            from aioffload.model import fused

            self.ops = fused
        self.mlp: Mlp = mlp or DenseMlp(self.ops)
        self.parallel = parallel

    def _sum_ranks(self, x: torch.Tensor) -> torch.Tensor:  # [T, H]: a row-parallel partial -> the sum
        return self.parallel.all_reduce_(x) if self.parallel is not None else x

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.parallel is not None:
            return self.parallel.embed(self.embed, input_ids)
        if self.embed.device == input_ids.device:
            return self.embed[input_ids]
        # Host-resident table: gather the rows on the host, copy only them.
        rows = self.embed[input_ids.to(self.embed.device, non_blocking=False)]
        return rows.to(input_ids.device, non_blocking=True)

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,  # [T] int64
        positions: torch.Tensor,  # [T] int64
        meta: AttentionMetadata,
        kv: KVCache,
    ) -> torch.Tensor:  # logits [R, V] float32, R = len(meta.last_token_idx) (V: this rank's rows under TP)
        """Each layer leaves its MLP output pending; the next layer's add + RMSNorm folds it
        into the residual stream (one fused kernel on CUDA)."""
        cfg, f = self.cfg, self.ops
        x = self.embed_tokens(input_ids)  # [T, H]
        pending: torch.Tensor | None = None
        step = meta  # the last layer's rows: every row, or the logits rows alone (meta.logits_rows)
        for i in range(cfg.num_layers):
            w = self.layers.acquire(i)
            h = f.add_rms_norm(x, pending, w.input_norm, cfg.rms_norm_eps)
            qkv = f.linear(h, w.qkv_w, w.qkv_b)  # [T, q + 2kv]
            q = f.rope_and_cache(
                qkv, positions, self.rope, meta.slot_mapping, kv.k[i], kv.v[i], cfg.num_heads, cfg.num_kv_heads,
                cfg.head_dim, w.q_norm, w.k_norm, cfg.rms_norm_eps,
            )  # fmt: skip
            if i == cfg.num_layers - 1 and meta.logits_rows is not None:  # no logits read the other rows' outputs
                step = meta.logits_rows
                q, x = q[meta.last_token_idx], x[meta.last_token_idx]  # [R, Hq, D], [R, H]
            o = self.attention.attend(q, kv.k[i], kv.v[i], step, self.scale)  # [T, Hq, D]
            o = self._sum_ranks(f.linear(o.reshape(q.shape[0], cfg.q_size), w.o_w))  # [T, H]
            h = f.add_rms_norm(x, o, w.post_norm, cfg.rms_norm_eps)
            pending = self._sum_ranks(self.mlp(i, h, w))  # [T, H]
            self.layers.release(i)
        assert pending is not None
        if not meta.decode_only and step is meta:  # decode-only: every row is a logits row
            x, pending = x[meta.last_token_idx], pending[meta.last_token_idx]  # [R, H]
        h = f.add_rms_norm(x, pending, self.final_norm, cfg.rms_norm_eps)
        return f.linear(h, self.lm_head).float()
