"""Checkpoint validation (every bad input names its file or tensor) and weight loading."""

from __future__ import annotations

import json
import re
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from aioffload.checkpoint.checkpoint import Checkpoint, CheckpointError
from aioffload.checkpoint.safetensors_io import read_header, read_tensor
from aioffload.config import SUPPORTED_ARCHITECTURES
from aioffload.model.layout import LayerWeights, layer_layout
from aioffload.worker.model_loader import load_weights
from tests.helpers import CPU, Runner, build, copy_checkpoint, edit_json, one_torch_thread, save_sharded
from tests.tiny_models import make_checkpoint


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_torch_thread():
        yield

PROMPTS = [[1, 5, 9, 33, 7, 100, 3], [1, 200, 201, 17]]


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("w"), "llama")


@pytest.fixture(scope="module")
def sharded_dir(tmp_path_factory, ckpt_dir):
    return save_sharded(ckpt_dir, tmp_path_factory.mktemp("sh") / "sharded", "200KB")


@pytest.fixture
def ckpt_copy(tmp_path, ckpt_dir):
    return copy_checkpoint(ckpt_dir, tmp_path / "model")


def open_fails(path) -> str:
    with pytest.raises(CheckpointError) as e:
        Checkpoint.open(path)
    return str(e.value)


# ---- bad folders and configs ----


def test_missing_folder(tmp_path):
    msg = open_fails(tmp_path / "no-such-model")
    assert "no-such-model" in msg and "does not exist" in msg


def test_folder_without_config(ckpt_copy):
    (ckpt_copy / "config.json").unlink()
    msg = open_fails(ckpt_copy)
    assert "config.json" in msg and "missing" in msg


def test_config_not_json(ckpt_copy):
    (ckpt_copy / "config.json").write_text("{ this is not json")
    msg = open_fails(ckpt_copy)
    assert "config.json" in msg and "not valid JSON" in msg


def test_generation_config_not_json(ckpt_copy):
    (ckpt_copy / "generation_config.json").write_text("eos: 2")
    msg = open_fails(ckpt_copy)
    assert "generation_config.json" in msg and "not valid JSON" in msg


def test_unsupported_architecture_lists_supported_ones(ckpt_copy):
    edit_json(ckpt_copy / "config.json", architectures=["GPT2LMHeadModel"])
    msg = open_fails(ckpt_copy)
    assert "config.json" in msg and "GPT2LMHeadModel" in msg
    for arch in ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
                 "MixtralForCausalLM", "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM"):  # fmt: skip
        assert arch in msg
    assert set(SUPPORTED_ARCHITECTURES) == {
        "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
        "MixtralForCausalLM", "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM",
    }  # fmt: skip


def test_no_weights_file(ckpt_copy):
    (ckpt_copy / "model.safetensors").unlink()
    msg = open_fails(ckpt_copy)
    assert "model.safetensors" in msg and "model.safetensors.index.json" in msg and str(ckpt_copy) in msg


def test_index_lists_missing_shard(tmp_path, sharded_dir):
    d = copy_checkpoint(sharded_dir, tmp_path / "sharded")
    shards = sorted(d.glob("model-*.safetensors"))
    assert len(shards) >= 2
    shards[1].unlink()
    msg = open_fails(d)
    assert shards[1].name in msg and "missing" in msg and "model.safetensors.index.json" in msg


def test_index_not_json(tmp_path, sharded_dir):
    d = copy_checkpoint(sharded_dir, tmp_path / "sharded")
    (d / "model.safetensors.index.json").write_text("[1, 2")
    msg = open_fails(d)
    assert "model.safetensors.index.json" in msg and "not a valid safetensors index" in msg


# ---- bad tensors ----


def resave_without(path, name):
    tensors = load_file(path)
    del tensors[name]
    save_file(tensors, path, metadata={"format": "pt"})


@pytest.mark.parametrize(
    "name", ["model.layers.1.mlp.up_proj.weight", "model.layers.3.self_attn.k_proj.weight", "lm_head.weight",
             "model.norm.weight", "model.embed_tokens.weight"],
)  # fmt: skip
def test_missing_tensor(ckpt_copy, name):
    resave_without(ckpt_copy / "model.safetensors", name)
    msg = open_fails(ckpt_copy)
    assert f"tensor {name} is missing" in msg and str(ckpt_copy) in msg


def test_wrong_shape(ckpt_copy):
    path = ckpt_copy / "model.safetensors"
    tensors = load_file(path)
    name = "model.layers.2.self_attn.k_proj.weight"
    assert tensors[name].shape == (32, 64)
    tensors[name] = torch.zeros(16, 64)
    save_file(tensors, path, metadata={"format": "pt"})
    msg = open_fails(ckpt_copy)
    assert msg == f"model.safetensors: tensor {name} has shape [16, 64], expected [32, 64]"


def test_wrong_shape_in_a_shard_names_the_shard(tmp_path, sharded_dir):
    d = copy_checkpoint(sharded_dir, tmp_path / "sharded")
    weight_map = json.loads((d / "model.safetensors.index.json").read_text())["weight_map"]
    name = "model.layers.3.mlp.down_proj.weight"
    shard = d / weight_map[name]
    tensors = load_file(shard)
    tensors[name] = torch.zeros(64, 127)
    save_file(tensors, shard, metadata={"format": "pt"})
    msg = open_fails(d)
    assert msg.startswith(f"{shard.name}: tensor {name} has shape [64, 127], expected [64, 128]")


def test_garbage_file(ckpt_copy):
    (ckpt_copy / "model.safetensors").write_bytes(bytes(range(256)) * 64)
    msg = open_fails(ckpt_copy)
    assert msg.startswith("model.safetensors: not a valid safetensors file")
    assert "impossible" in msg


def test_garbage_header(ckpt_copy):
    body = b"\xff\xfegarbage that is not json" + b"\x00" * 100
    (ckpt_copy / "model.safetensors").write_bytes(struct.pack("<Q", 32) + body)
    msg = open_fails(ckpt_copy)
    assert msg.startswith("model.safetensors: not a valid safetensors file (header is not JSON")


def test_header_not_an_object(ckpt_copy):
    header = b"[1, 2, 3]"
    (ckpt_copy / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header)
    msg = open_fails(ckpt_copy)
    assert msg == "model.safetensors: not a valid safetensors file (header is not an object)"


def test_bad_header_entry(ckpt_copy):
    header = json.dumps({"x": {"dtype": "F99", "shape": [1], "data_offsets": [0, 4]}}).encode()
    (ckpt_copy / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\x00" * 4)
    msg = open_fails(ckpt_copy)
    assert msg.startswith("model.safetensors: bad header entry for 'x'")


@pytest.mark.parametrize("keep", [0.5, 0.999])
def test_truncated_file(ckpt_copy, keep):
    path = ckpt_copy / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    msg = open_fails(ckpt_copy)
    assert msg.startswith("model.safetensors: tensor '")
    assert "truncated or corrupt file" in msg


def test_file_shorter_than_header_length(ckpt_copy):
    (ckpt_copy / "model.safetensors").write_bytes(b"\x01\x02\x03")
    msg = open_fails(ckpt_copy)
    assert msg == "model.safetensors: not a valid safetensors file (shorter than its header)"


def test_header_length_impossible(ckpt_copy):
    path = ckpt_copy / "model.safetensors"
    data = path.read_bytes()
    n = len(data) - 7  # one byte longer than the rest of the file
    path.write_bytes(struct.pack("<Q", n) + data[8:])
    msg = open_fails(ckpt_copy)
    assert msg == f"model.safetensors: not a valid safetensors file (header length {n} is impossible)"


# ---- good checkpoints ----


def test_header_matches_safetensors_library(ckpt_dir):
    ref = load_file(ckpt_dir / "model.safetensors")
    entries = read_header(ckpt_dir / "model.safetensors")
    assert set(entries) == set(ref)
    for name in ("model.embed_tokens.weight", "model.layers.0.input_layernorm.weight", "lm_head.weight"):
        assert torch.equal(read_tensor(entries[name]), ref[name])


def test_sharded_checkpoint_gives_same_logits(ckpt_dir, sharded_dir):
    assert (sharded_dir / "model.safetensors.index.json").is_file()
    assert len(list(sharded_dir.glob("model-*.safetensors"))) >= 2
    single = Checkpoint.open(ckpt_dir)
    sharded = Checkpoint.open(sharded_dir)
    assert single.model_config == sharded.model_config
    assert len({e.path for e in sharded.entries.values()}) >= 2
    pre_a, dec_a, gen_a = Runner(build(ckpt_dir)[0], PROMPTS).generate(3)
    pre_b, dec_b, gen_b = Runner(build(sharded_dir)[0], PROMPTS).generate(3)
    assert torch.equal(pre_a, pre_b)
    assert all(torch.equal(a, b) for a, b in zip(dec_a, dec_b, strict=True))
    assert gen_a == gen_b


@pytest.mark.parametrize("offloaded", [frozenset(), frozenset({1})])
def test_bfloat16_conversion_is_torch_rounding(ckpt_dir, offloaded):
    ref = load_file(ckpt_dir / "model.safetensors")
    assert ref["model.embed_tokens.weight"].dtype == torch.float32
    ckpt = Checkpoint.open(ckpt_dir)
    w = load_weights(ckpt, torch.bfloat16, CPU, offloaded=offloaded)
    assert torch.equal(w.embed, ref["model.embed_tokens.weight"].to(torch.bfloat16))
    assert torch.equal(w.lm_head, ref["lm_head.weight"].to(torch.bfloat16))
    assert w.embed.dtype == w.lm_head.dtype == w.final_norm.dtype == torch.bfloat16
    layer = LayerWeights(w.host[1], w.layout) if 1 in offloaded else w.resident[1]
    assert layer.flat.dtype == torch.bfloat16
    p = "model.layers.1."
    qkv = torch.cat([ref[f"{p}self_attn.{x}_proj.weight"] for x in "qkv"])
    gate_up = torch.cat([ref[f"{p}mlp.gate_proj.weight"], ref[f"{p}mlp.up_proj.weight"]])
    assert torch.equal(layer.qkv_w, qkv.to(torch.bfloat16))
    assert torch.equal(layer.gate_up_w, gate_up.to(torch.bfloat16))
    assert torch.equal(layer.down_w, ref[f"{p}mlp.down_proj.weight"].to(torch.bfloat16))
    assert torch.equal(layer.input_norm, ref[f"{p}input_layernorm.weight"].to(torch.bfloat16))
    # The conversion is not a no-op on this data, so the test would notice a missing .to().
    assert not torch.equal(layer.qkv_w.float(), qkv)


def test_layer_buffer_layout_and_padding(ckpt_dir):
    """Every view sits at its aligned offset inside one flat buffer; padding between views is zero."""
    ckpt = Checkpoint.open(ckpt_dir)
    layout = layer_layout(ckpt.model_config)
    ref = load_file(ckpt_dir / "model.safetensors")
    w = load_weights(ckpt, torch.float32, CPU, offloaded=frozenset({2}))
    assert sorted(w.resident) == [0, 1, 3] and sorted(w.host) == [2]
    flat = w.host[2]
    assert flat.shape == (layout.numel,)
    covered = torch.zeros(layout.numel, dtype=torch.bool)
    end = 0
    for spec in layout.params:
        assert spec.offset % 128 == 0 and spec.offset >= end
        n = int(torch.Size(spec.shape).numel())
        covered[spec.offset : spec.offset + n] = True
        end = spec.offset + n
        want = torch.cat([ref[f"model.layers.2.{s}"] for s in spec.sources])
        assert torch.equal(flat[spec.offset : spec.offset + n].view(spec.shape), want), spec.name
    assert layout.numel - end < 128
    assert torch.count_nonzero(flat[~covered]) == 0


def test_tied_embeddings_share_storage(tmp_path):
    path = make_checkpoint(tmp_path, "qwen2", tie=True)
    ckpt = Checkpoint.open(path)
    assert ckpt.model_config.tie_word_embeddings and "lm_head.weight" not in ckpt.entries
    w = load_weights(ckpt, torch.float32, CPU)
    assert w.lm_head.data_ptr() == w.embed.data_ptr()
    assert w.resident[0].qkv_b is not None and w.resident[0].qkv_b.shape == (128,)


def test_resolve_dtype_rules(ckpt_copy):
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    ckpt = Checkpoint.open(ckpt_copy)
    assert ckpt.model_config.checkpoint_dtype == "float32"
    for name, dt in (("bfloat16", torch.bfloat16), ("float16", torch.float16), ("float32", torch.float32)):
        assert ckpt.resolve_dtype(name, cpu) is dt
        assert ckpt.resolve_dtype(name, cuda) is dt
    assert ckpt.resolve_dtype("auto", cpu) is torch.float32
    assert ckpt.resolve_dtype("auto", cuda) is torch.float32
    declared_to_cuda = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float8_e4m3": torch.bfloat16}
    for declared, on_cuda in declared_to_cuda.items():
        edit_json(ckpt_copy / "config.json", dtype=declared)
        c = Checkpoint.open(ckpt_copy)
        assert c.model_config.checkpoint_dtype == declared
        assert c.resolve_dtype("auto", cuda) is on_cuda
        assert c.resolve_dtype("auto", cpu) is torch.float32  # half precision is slow on the CPU


def test_legacy_torch_dtype_key(ckpt_copy):
    cfg = json.loads((ckpt_copy / "config.json").read_text())
    del cfg["dtype"]
    cfg["torch_dtype"] = "float16"
    (ckpt_copy / "config.json").write_text(json.dumps(cfg))
    assert Checkpoint.open(ckpt_copy).resolve_dtype("auto", torch.device("cuda")) is torch.float16


@pytest.mark.parametrize("eos, want", [([2, 7, 11], (2, 7, 11)), (5, (5,)), (None, (2,))])
def test_generation_config_eos_ids(ckpt_copy, eos, want):
    gen = ckpt_copy / "generation_config.json"
    data = json.loads(gen.read_text())
    if eos is None:
        del data["eos_token_id"]
    else:
        data["eos_token_id"] = eos
    gen.write_text(json.dumps(data))
    assert Checkpoint.open(ckpt_copy).model_config.eos_token_ids == want


def test_eos_ids_from_config_without_generation_config(ckpt_copy):
    (ckpt_copy / "generation_config.json").unlink()
    edit_json(ckpt_copy / "config.json", eos_token_id=[9, 3])
    assert Checkpoint.open(ckpt_copy).model_config.eos_token_ids == (9, 3)


def test_config_error_starts_with_full_path(ckpt_copy):
    (ckpt_copy / "config.json").write_text("nope")
    msg = open_fails(ckpt_copy)
    assert re.match(rf"^{re.escape(str(ckpt_copy / 'config.json'))}: not valid JSON \(", msg)
