"""Synthetic Llama- and MoE-shaped checkpoints for benchmarks: random weights, real file format.

The folder is what `from_pretrained` and our loader both read: config.json,
generation_config.json, safetensors shards (one per group of decoder layers) with
model.safetensors.index.json, and a WordLevel tokenizer over "t0".."t{V-1}" so any
generated id decodes. Weights are drawn on the GPU when there is one (16 GB of random
bf16 on the CPU takes ~225 s; on the GPU it is the disk write that costs). A marker
file makes a second call with the same shape, dtype and seed reuse the folder; a
non-empty folder without it is never overwritten.

MoE shapes (Qwen3-MoE) write per-expert tensors as transformers saves them. `num_layers`
writes fewer decoder layers than the shape has (the 61 GB Qwen3-30B-A3B shape does not
fit a benchmark machine's disk or time budget; its per-layer figures do).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

MARKER = ".aioffload-synthetic.json"
LAYERS_PER_SHARD = 4
INIT_STD = 0.02

SHAPES: dict[str, dict] = {
    "llama3-8b": dict(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, max_position_embeddings=8192,
        bos_token_id=128000, eos_token_id=128001,
    ),
    "tiny": dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=512, rope_theta=500000.0, max_position_embeddings=2048,
        bos_token_id=1, eos_token_id=2,
    ),
    # Qwen3-30B-A3B: 48 layers, 128 experts, top-8, expert intermediate 768; 61 GB in bf16.
    "qwen3-30b-a3b": dict(
        architecture="Qwen3MoeForCausalLM", hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
        num_experts=128, num_experts_per_tok=8, norm_topk_prob=True, num_hidden_layers=48, num_attention_heads=32,
        num_key_value_heads=4, head_dim=128, vocab_size=151936, rope_theta=1000000.0,
        max_position_embeddings=40960, bos_token_id=151643, eos_token_id=151645,
    ),
    "tiny-moe": dict(
        architecture="Qwen3MoeForCausalLM", hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
        num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, vocab_size=512, rope_theta=1000000.0, max_position_embeddings=2048,
        bos_token_id=1, eos_token_id=2,
    ),
}  # fmt: skip

# Decoder layers a benchmark writes when not told (--synthetic-layers): the whole 48-layer, 61 GB
# Qwen3-30B-A3B does not fit the benchmark machine's disk and time budget; 12 layers (15.3 GB) do.
BENCH_LAYERS = {"qwen3-30b-a3b": 12}

_DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}


def hf_config(shape: str, dtype: torch.dtype = torch.bfloat16, num_layers: int | None = None) -> dict:
    """config.json contents for a named shape (untied LlamaForCausalLM unless the shape names an
    architecture); `num_layers` overrides the shape's layer count."""
    if shape not in SHAPES:
        raise ValueError(f"unknown synthetic shape {shape!r}; choose from {', '.join(SHAPES)}")
    s = dict(SHAPES[shape])
    arch = s.pop("architecture", "LlamaForCausalLM")
    if num_layers is not None:
        s["num_hidden_layers"] = num_layers
    moe = {"model_type": "qwen3_moe", "decoder_sparse_step": 1, "mlp_only_layers": []}
    return {
        "architectures": [arch],
        "model_type": "llama",
        **(moe if arch == "Qwen3MoeForCausalLM" else {}),
        "head_dim": s["hidden_size"] // s["num_attention_heads"],
        **s,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-5,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "torch_dtype": _DTYPE_NAMES[dtype],
        "initializer_range": INIT_STD,
        "use_cache": True,
    }


def _layer_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    h, i = cfg["hidden_size"], cfg["intermediate_size"]
    d = cfg["head_dim"]
    q = cfg["num_attention_heads"] * d
    kv = cfg["num_key_value_heads"] * d
    shapes = {
        "input_layernorm.weight": (h,),
        "self_attn.q_proj.weight": (q, h),
        "self_attn.k_proj.weight": (kv, h),
        "self_attn.v_proj.weight": (kv, h),
        "self_attn.o_proj.weight": (h, q),
        "post_attention_layernorm.weight": (h,),
    }
    if "num_experts" not in cfg:
        return shapes | {"mlp.gate_proj.weight": (i, h), "mlp.up_proj.weight": (i, h), "mlp.down_proj.weight": (h, i)}
    shapes |= {"self_attn.q_norm.weight": (d,), "self_attn.k_norm.weight": (d,)}
    shapes["mlp.gate.weight"] = (cfg["num_experts"], h)
    m = cfg["moe_intermediate_size"]
    for e in range(cfg["num_experts"]):
        p = f"mlp.experts.{e}."
        shapes |= {f"{p}gate_proj.weight": (m, h), f"{p}up_proj.weight": (m, h), f"{p}down_proj.weight": (h, m)}
    return shapes


def _shard_plan(cfg: dict) -> list[dict[str, tuple[int, ...]]]:
    """Tensor name -> shape, per shard: embed with the first layer group, norm + lm_head with the last."""
    h, v, n = cfg["hidden_size"], cfg["vocab_size"], cfg["num_hidden_layers"]
    shards: list[dict[str, tuple[int, ...]]] = []
    for first in range(0, n, LAYERS_PER_SHARD):
        shard = {"model.embed_tokens.weight": (v, h)} if first == 0 else {}
        for layer in range(first, min(n, first + LAYERS_PER_SHARD)):
            shard.update({f"model.layers.{layer}.{k}": s for k, s in _layer_shapes(cfg).items()})
        shards.append(shard)
    shards[-1].update({"model.norm.weight": (h,), "lm_head.weight": (v, h)})
    return shards


def _write_tokenizer(root: Path, cfg: dict) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {f"t{i}": i for i in range(cfg["vocab_size"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    # WordPiece's decoder puts a space before every token not starting with "##": a plain
    # space join, so any id sequence decodes to "tA tB ...".
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    tok.save(str(root / "tokenizer.json"))
    tok_cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": f"t{cfg['bos_token_id']}",
        "eos_token": f"t{cfg['eos_token_id']}",
        "add_bos_token": False,
        "model_max_length": cfg["max_position_embeddings"],
    }
    (root / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=1))


def make_synthetic_checkpoint(
    path: str | Path,
    shape: str = "llama3-8b",
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str | None = None,
    seed: int = 0,
    num_layers: int | None = None,
) -> Path:
    """Write (or reuse) a random-weight HF folder of `shape` at `path` (`num_layers` decoder layers,
    default the shape's); returns the path.

    Weights ~ N(0, 0.02), norm weights = 1, drawn on `device` (default: CUDA when available).
    """
    from safetensors.torch import save_file

    root = Path(path)
    cfg = hf_config(shape, dtype, num_layers)
    marker = {"shape": shape, "dtype": _DTYPE_NAMES[dtype], "seed": seed, "config": cfg}
    marker_path = root / MARKER
    if marker_path.is_file():
        try:
            if json.loads(marker_path.read_text()) == {**marker, "complete": True}:
                print(f"synthetic checkpoint: reusing {root} ({shape}, {marker['dtype']})", flush=True)
                return root
        except ValueError:
            pass
    elif root.is_dir() and any(root.iterdir()):
        raise ValueError(f"{root} is not empty and holds no {MARKER}: refusing to write a synthetic checkpoint there")
    root.mkdir(parents=True, exist_ok=True)
    # The marker says "ours" from now on, and "complete" only once every file is written.
    marker_path.write_text(json.dumps({**marker, "complete": False}, indent=1))
    for old in root.glob("model-*.safetensors"):
        old.unlink()
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gen = torch.Generator(device=dev).manual_seed(seed)
    shards = _shard_plan(cfg)
    total_bytes = sum(_numel(s) for shard in shards for s in shard.values()) * dtype.itemsize
    print(
        f"synthetic checkpoint: writing {shape} ({total_bytes / 1e9:.2f} GB {marker['dtype']}) to {root}, "
        f"weights drawn on {dev.type}",
        flush=True,
    )
    t0 = time.perf_counter()
    weight_map: dict[str, str] = {}
    done = 0
    for k, shard in enumerate(shards):
        name = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for tname, tshape in shard.items():
            if tname.endswith("norm.weight"):
                t = torch.ones(tshape, dtype=dtype, device=dev)
            else:
                t = torch.empty(tshape, dtype=dtype, device=dev).normal_(0.0, INIT_STD, generator=gen)
            tensors[tname] = t.cpu()
            weight_map[tname] = name
        save_file(tensors, str(root / name), metadata={"format": "pt"})
        done += sum(t.numel() for t in tensors.values()) * dtype.itemsize
        del tensors
        print(f"  {name}: {done / 1e9:.2f}/{total_bytes / 1e9:.2f} GB, {time.perf_counter() - t0:.1f} s", flush=True)
    index = {"metadata": {"total_size": total_bytes}, "weight_map": weight_map}
    (root / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    (root / "config.json").write_text(json.dumps(cfg, indent=1))
    gen_cfg = {"bos_token_id": cfg["bos_token_id"], "eos_token_id": cfg["eos_token_id"], "do_sample": False}
    (root / "generation_config.json").write_text(json.dumps(gen_cfg, indent=1))
    _write_tokenizer(root, cfg)
    marker_path.write_text(json.dumps({**marker, "complete": True}, indent=1))
    # Flush the written pages to disk before anything is timed: on the H200 machine the kernel wrote
    # 12-16 GB of dirty pages back while the next minute's host shares ran, and they took 1.3-1.8x
    # their quiet time (BENCHMARKS.md, sixth session). A sync there took 5 s.
    t1 = time.perf_counter()
    os.sync()
    print(f"synthetic checkpoint: done in {time.perf_counter() - t0:.1f} s (synced to disk in "
          f"{time.perf_counter() - t1:.1f} s)", flush=True)  # fmt: skip
    return root


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
