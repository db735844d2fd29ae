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
    torch.manual_seed(seed)
    model = cls(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():  # norms away from 1 so they matter
            if p.dim() == 1:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0, 0.08)
    path = root / f"{arch}-{seed}"
    model.save_pretrained(path, safe_serialization=True)
    return path


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
