"""One decoder for the Llama family: Llama 2/3 (GQA, llama3 rope scaling), Mistral,
Qwen2 (qkv bias) and Qwen3 (q/k RMSNorm); tied embeddings.

The forward pass takes a flat batch of T tokens from S sequences (each a prefill chunk
or one decode token) and returns logits for the last token of each sequence only.
Layer weights come from a `LayerSource`: resident layers hand out their views, the
transfer queue hands out staging slots; the model does not know which is which.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
import torch.nn.functional as F

from aioffload.attention import AttentionBackend, AttentionMetadata
from aioffload.config import ModelConfig
from aioffload.kv_cache import KVCache
from aioffload.model.layout import LayerWeights


class LayerSource(Protocol):
    """Hands out layer i's weights for the duration of its compute."""

    def acquire(self, layer: int) -> LayerWeights: ...

    def release(self, layer: int) -> None: ...


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Same arithmetic as HF: normalise in float32, cast back, then scale.
    dtype = x.dtype
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(dtype)


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


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [T, H, D]; cos, sin: [T, 1, D]
    return x * cos + _rotate_half(x) * sin


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
        # CUDA with the Triton attention backend: fused kernels between the GEMVs.
        self.fused = None
        if device.type == "cuda" and attention.name == "torch":
            from aioffload.model import fused

            self.fused = fused

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
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
    ) -> torch.Tensor:  # logits [S, V] float32
        cfg = self.cfg
        x = self.embed_tokens(input_ids)  # [T, H]
        if self.fused is not None:
            return self._forward_fused(x, positions, meta, kv)
        cos_sin = self.rope[positions]  # [T, 2, D]
        cos, sin = cos_sin[:, 0:1], cos_sin[:, 1:2]  # [T, 1, D]
        for i in range(cfg.num_layers):
            w = self.layers.acquire(i)
            x = self._layer(x, w, cos, sin, meta, kv.k[i], kv.v[i])
            self.layers.release(i)
        x = x[meta.last_token_idx]  # [S, H]
        x = rms_norm(x, self.final_norm, cfg.rms_norm_eps)
        return F.linear(x, self.lm_head).float()

    def _forward_fused(
        self, x: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata, kv: KVCache
    ) -> torch.Tensor:
        """CUDA path: each layer leaves its MLP output pending; the next layer's fused
        add + RMSNorm folds it into the residual stream."""
        cfg, f = self.cfg, self.fused
        assert f is not None
        pending: torch.Tensor | None = None
        t = x.shape[0]
        for i in range(cfg.num_layers):
            w = self.layers.acquire(i)
            h = f.add_rms_norm(x, pending, w.input_norm, cfg.rms_norm_eps)
            qkv = F.linear(h, w.qkv_w, w.qkv_b)
            q = f.rope_and_cache(
                qkv, positions, self.rope, meta.slot_mapping, kv.k[i], kv.v[i], cfg.num_heads, cfg.num_kv_heads,
                cfg.head_dim, w.q_norm, w.k_norm, cfg.rms_norm_eps,
            )  # fmt: skip
            o = self.attention.attend(q, kv.k[i], kv.v[i], meta, self.scale)  # [T, Hq, D]
            h = f.add_rms_norm(x, F.linear(o.view(t, cfg.q_size), w.o_w), w.post_norm, cfg.rms_norm_eps)
            pending = F.linear(f.silu_mul(F.linear(h, w.gate_up_w)), w.down_w)
            self.layers.release(i)
        x = x[meta.last_token_idx]  # [S, H]
        h = f.add_rms_norm(x, pending[meta.last_token_idx], self.final_norm, cfg.rms_norm_eps)
        return F.linear(h, self.lm_head).float()

    def _layer(
        self,
        x: torch.Tensor,  # [T, H]
        w: LayerWeights,
        cos: torch.Tensor,
        sin: torch.Tensor,
        meta: AttentionMetadata,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
    ) -> torch.Tensor:
        cfg = self.cfg
        t = x.shape[0]
        h = rms_norm(x, w.input_norm, cfg.rms_norm_eps)
        qkv = F.linear(h, w.qkv_w, w.qkv_b)  # [T, q + 2kv]
        q, k, v = qkv.split([cfg.q_size, cfg.kv_size, cfg.kv_size], dim=-1)
        q = q.view(t, cfg.num_heads, cfg.head_dim)
        k = k.view(t, cfg.num_kv_heads, cfg.head_dim)
        v = v.view(t, cfg.num_kv_heads, cfg.head_dim)
        if w.q_norm is not None:
            q = rms_norm(q, w.q_norm, cfg.rms_norm_eps)
            k = rms_norm(k, w.k_norm, cfg.rms_norm_eps)
        q = apply_rope(q, cos, sin)
        k = apply_rope(k, cos, sin)
        o = self.attention.forward(q, k, v.contiguous(), k_cache, v_cache, meta, self.scale)  # [T, Hq, D]
        x = x + F.linear(o.reshape(t, cfg.q_size), w.o_w)
        h = rms_norm(x, w.post_norm, cfg.rms_norm_eps)
        gate, up = F.linear(h, w.gate_up_w).chunk(2, dim=-1)
        return x + F.linear(F.silu(gate) * up, w.down_w)
