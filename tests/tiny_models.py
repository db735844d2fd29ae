"""Tiny random Hugging Face checkpoints for tests (saved with save_pretrained)."""

from __future__ import annotations

from pathlib import Path

import torch

ARCHS = ("llama", "llama3", "mistral", "qwen2", "qwen3")


def make_checkpoint(root: Path, arch: str = "llama", seed: int = 0, layers: int = 4, tie: bool = False) -> Path:
    import transformers as tf

    common = dict(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5, tie_word_embeddings=tie,
        bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    if arch == "llama":
        cfg, cls = tf.LlamaConfig(**common, rope_theta=10000.0), tf.LlamaForCausalLM
    elif arch == "llama3":
        scaling = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                       original_max_position_embeddings=64)  # fmt: skip
        cfg = tf.LlamaConfig(**common, rope_theta=500000.0, rope_scaling=scaling)
        cls = tf.LlamaForCausalLM
    elif arch == "mistral":
        cfg, cls = tf.MistralConfig(**common, sliding_window=None), tf.MistralForCausalLM
    elif arch == "qwen2":
        cfg, cls = tf.Qwen2Config(**common), tf.Qwen2ForCausalLM
    elif arch == "qwen3":
        cfg, cls = tf.Qwen3Config(**common, head_dim=32), tf.Qwen3ForCausalLM
    else:
        raise ValueError(arch)
    return _randomized(cls, cfg, seed, root / f"{arch}-{seed}")


def add_word_tokenizer(path: Path, vocab_size: int = 256, eos_id: int = 2) -> Path:
    """A WordLevel tokenizer over tokens "w0".."w{V-1}" so every id decodes ("w5 w17 ...")."""
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"eos_token": f"w{eos_id}", "add_bos_token": False}))
    return path


# name -> (family, experts, top-k, extra config): odd expert counts, top-1 and top-2, shared expert on and
# off, norm_topk_prob both ways, and mixed dense/sparse layers (mlp_only_layers, decoder_sparse_step).
MOE_ARCHS = {
    "mixtral-e3-top1": ("mixtral", 3, 1, {}),
    "mixtral-e5-top2": ("mixtral", 5, 2, {}),
    "qwen2_moe-e5-top2-shared": ("qwen2_moe", 5, 2, dict(shared_expert_intermediate_size=48, mlp_only_layers=[1])),
    "qwen2_moe-e7-top1-shared-norm": ("qwen2_moe", 7, 1, dict(shared_expert_intermediate_size=40,
                                                              norm_topk_prob=True, decoder_sparse_step=2)),
    "qwen3_moe-e7-top2-norm": ("qwen3_moe", 7, 2, dict(norm_topk_prob=True)),
    "qwen3_moe-e5-top2-mixed": ("qwen3_moe", 5, 2, dict(norm_topk_prob=False, mlp_only_layers=[0, 3])),
}  # fmt: skip


def make_moe_checkpoint(root: Path, name: str, seed: int = 0, layers: int = 4) -> Path:
    """A tiny random MoE checkpoint of MOE_ARCHS[name], saved by transformers (per-expert tensors)."""
    import transformers as tf

    family, experts, top_k, extra = MOE_ARCHS[name]
    common = dict(
        vocab_size=256, hidden_size=64, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=512, rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
        num_experts_per_tok=top_k,
    )  # fmt: skip
    if family == "mixtral":
        cfg = tf.MixtralConfig(**common, intermediate_size=32, num_local_experts=experts, **extra)
        cls = tf.MixtralForCausalLM
    elif family == "qwen2_moe":
        cfg = tf.Qwen2MoeConfig(**common, intermediate_size=96, moe_intermediate_size=32, num_experts=experts,
                                **extra)  # fmt: skip
        cls = tf.Qwen2MoeForCausalLM
    else:
        cfg = tf.Qwen3MoeConfig(**common, head_dim=32, intermediate_size=96, moe_intermediate_size=32,
                                num_experts=experts, **extra)  # fmt: skip
        cls = tf.Qwen3MoeForCausalLM
    return _randomized(cls, cfg, seed, root / f"{name}-{seed}")


def _randomized(cls, cfg, seed: int, path: Path) -> Path:  # type: ignore[no-untyped-def]
    """A transformers model of `cls` with seeded random weights, saved as safetensors at `path`."""
    torch.manual_seed(seed)
    model = cls(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():  # norms away from 1 so they matter
            if p.dim() == 1:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0, 0.08)
    model.save_pretrained(path, safe_serialization=True)
    return path
