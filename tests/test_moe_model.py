"""MoE decoders against Hugging Face transformers on tiny random checkpoints (Mixtral, Qwen2-MoE with
its shared expert, Qwen3-MoE; odd expert counts, top-1 and top-2, dense layers mixed in), the
grouped GEMM against a loop of matmuls, and MoE config and checkpoint errors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from aioffload.checkpoint.checkpoint import Checkpoint, CheckpointError
from aioffload.config import ConfigError, ModelConfig
from aioffload.model import ops
from aioffload.model.layout import ExpertWeights, expert_layout, layer_layout
from aioffload.model.moe import expert_counts, grouped_linear, route, run_experts
from tests.helpers import copy_checkpoint, one_torch_thread
from tests.test_model import PROMPTS, hf_model, run_ours
from tests.tiny_models import MOE_ARCHS, make_moe_checkpoint


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe")
    return {name: make_moe_checkpoint(root, name, seed=i) for i, name in enumerate(MOE_ARCHS)}


@pytest.mark.parametrize("name", MOE_ARCHS)
def test_config_parsed_as_transformers_builds_the_model(ckpts, name):
    cfg = Checkpoint.open(ckpts[name]).model_config
    hf = hf_model(ckpts[name])
    family, experts, top_k, extra = MOE_ARCHS[name]
    assert cfg.is_moe and cfg.num_experts == experts and cfg.num_experts_per_tok == top_k
    sparse = tuple(i for i, layer in enumerate(hf.model.layers) if hasattr(layer.mlp, "experts"))
    assert cfg.moe_layers == sparse
    assert cfg.norm_topk_prob == (family == "mixtral" or extra.get("norm_topk_prob", False))
    assert cfg.shared_expert_intermediate_size == extra.get("shared_expert_intermediate_size", 0)
    assert cfg.qk_norm == (family == "qwen3_moe") and cfg.qkv_bias == (family == "qwen2_moe")
    assert cfg.router_weights_fp32 == (family == "mixtral")


@pytest.mark.parametrize("name", MOE_ARCHS)
def test_logits_match_transformers(ckpts, name):
    hf = hf_model(ckpts[name])
    pre, dec, gen = run_ours(ckpts[name], PROMPTS, decode_steps=4)
    with torch.no_grad():
        for i, p in enumerate(PROMPTS):
            ref = hf(torch.tensor([p + gen[i]])).logits[0].float()
            diff = (pre[i] - ref[len(p) - 1]).abs().max().item()
            assert diff < 1e-4, f"{name} prefill seq {i}: max abs diff {diff}"
            for step, lg in enumerate(dec):
                d = (lg[i] - ref[len(p) + step]).abs().max().item()
                assert d < 1e-4, f"{name} decode step {step} seq {i}: max abs diff {d}"


@pytest.mark.parametrize("name", MOE_ARCHS)
def test_greedy_32_tokens_equal_transformers_generate(ckpts, name):
    hf = hf_model(ckpts[name])
    prompt = [1, 17, 99, 4, 250, 8]
    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=32, min_new_tokens=32, do_sample=False)[0]
    _, dec, gen = run_ours(ckpts[name], [prompt], decode_steps=31)
    assert gen[0] + [int(dec[-1][0].argmax())] == ref[len(prompt) :].tolist()


@pytest.mark.parametrize("name", ["mixtral-e5-top2", "qwen2_moe-e5-top2-shared"])
def test_chunked_prefill_matches_whole_prefill(ckpts, name):
    pre_a, _, gen_a = run_ours(ckpts[name], PROMPTS, decode_steps=3)
    pre_b, _, gen_b = run_ours(ckpts[name], PROMPTS, decode_steps=3, chunk=3)
    assert gen_a == gen_b
    assert (pre_a - pre_b).abs().max().item() < 1e-5


def test_router_is_transformers_topk_router():
    import transformers as tf

    g = torch.Generator().manual_seed(0)
    h = torch.randn(9, 16, generator=g)
    qwen = tf.Qwen3MoeConfig(hidden_size=16, num_experts=7, num_experts_per_tok=3, norm_topk_prob=True)
    mixtral = tf.MixtralConfig(hidden_size=16, num_local_experts=5, num_experts_per_tok=2)
    from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter

    for router, k, norm, fp32 in (
        (Qwen3MoeTopKRouter(qwen), 3, True, False),
        (MixtralTopKRouter(mixtral), 2, True, True),
    ):
        torch.nn.init.normal_(router.weight, generator=g)
        for dtype in (torch.float32, torch.bfloat16):
            r = router.to(dtype)
            _, ref_w, ref_i = r(h.to(dtype))
            w, i = route(torch.nn.functional.linear(h.to(dtype), r.weight), k, norm, fp32)
            assert torch.equal(i, ref_i) and torch.equal(w, ref_w) and w.dtype == ref_w.dtype


def test_grouped_gemm_equals_a_loop_of_matmuls():
    g = torch.Generator().manual_seed(1)
    e, t, k, h, inter = 5, 11, 2, 32, 16
    idx = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)])  # [T, k], distinct per token
    idx[:, 0] = idx[:, 0].clamp(max=3)  # expert 4 rarely, some experts never: empty groups
    idx[:, 1] = torch.where(idx[:, 1] == idx[:, 0], (idx[:, 0] + 1) % 4, idx[:, 1]).clamp(max=3)
    weights = torch.rand(t, k, generator=g)
    stack = torch.randn(e, 2 * inter * h + h * inter, generator=g) * 0.1
    layout = expert_layout(ModelConfig.from_hf({
        "architectures": ["Qwen3MoeForCausalLM"], "vocab_size": 8, "hidden_size": h, "intermediate_size": 8,
        "num_hidden_layers": 1, "num_attention_heads": 2, "num_experts": e, "moe_intermediate_size": inter,
        "num_experts_per_tok": k,
    }))  # fmt: skip
    pad = torch.zeros(e, layout.numel - stack.shape[1])
    ew = ExpertWeights(torch.cat([stack, pad], 1), layout)
    x = torch.randn(t, h, generator=g)
    counts = expert_counts(idx, e)
    assert counts.tolist() == [int((idx == j).sum()) for j in range(e)]
    a = run_experts(x, idx, weights, counts, ew, ops, grouped=True)
    b = run_experts(x, idx, weights, counts, ew, ops, grouped=False)
    assert torch.allclose(a, b, atol=1e-6)
    want = torch.zeros(t, h)  # transformers' eager expert loop
    for j in range(e):
        tok, pos = torch.where(idx == j)
        gate, up = torch.nn.functional.linear(x[tok], ew.gate_up_w[j]).chunk(2, dim=-1)
        want.index_add_(0, tok, torch.nn.functional.linear(torch.nn.functional.silu(gate) * up, ew.down_w[j])
                        * weights[tok, pos, None])  # fmt: skip
    assert torch.allclose(a, want, atol=1e-5)
    offs = counts.cumsum(0, dtype=torch.int32)  # group g: rows offs[g-1]:offs[g] times expert g
    sorted_x = x[torch.argsort(idx.reshape(-1), stable=True) // k]
    rows = grouped_linear(sorted_x, ew.gate_up_w, offs, grouped=False)
    start = 0
    for j, end in enumerate(offs.tolist()):
        assert torch.equal(rows[start:end], sorted_x[start:end] @ ew.gate_up_w[j].T)
        start = end


def test_layouts_of_dense_and_sparse_layers(ckpts):
    cfg = Checkpoint.open(ckpts["qwen2_moe-e5-top2-shared"]).model_config  # layer 1 dense
    sparse, dense = layer_layout(cfg, 0), layer_layout(cfg, 1)
    names = [p.name for p in sparse.params]
    assert names[-4:] == ["router_w", "shared_gate_up_w", "shared_down_w", "shared_gate_w"]
    assert "gate_up_w" not in names and [p.name for p in dense.params][-2:] == ["gate_up_w", "down_w"]
    ex = expert_layout(cfg)
    assert [(p.name, p.shape) for p in ex.params] == [("gate_up_w", (64, 64)), ("down_w", (64, 32))]
    assert ex.params[0].sources == ("mlp.experts.{e}.gate_proj.weight", "mlp.experts.{e}.up_proj.weight")
    assert expert_layout(cfg, 3).params[1].sources == ("mlp.experts.3.down_proj.weight",)
    assert expert_layout(cfg, 3).numel == ex.numel
    mixtral = Checkpoint.open(ckpts["mixtral-e3-top1"]).model_config
    assert [p.sources for p in expert_layout(mixtral).params] == [
        ("block_sparse_moe.experts.{e}.w1.weight", "block_sparse_moe.experts.{e}.w3.weight"),
        ("block_sparse_moe.experts.{e}.w2.weight",),
    ]


def _rewrite(path, drop=(), change=None):
    f = path / "model.safetensors"
    tensors = load_file(f)
    for name in drop:
        del tensors[name]
    for name, t in (change or {}).items():
        tensors[name] = t
    save_file(tensors, f, metadata={"format": "pt"})


def test_missing_expert_tensor_is_named(ckpts, tmp_path):
    path = copy_checkpoint(ckpts["qwen3_moe-e7-top2-norm"], tmp_path / "c")
    _rewrite(path, drop=["model.layers.2.mlp.experts.6.up_proj.weight"])
    with pytest.raises(CheckpointError, match=r"tensor model\.layers\.2\.mlp\.experts\.6\.up_proj\.weight is missing"):
        Checkpoint.open(path)


def test_wrong_expert_shape_is_named(ckpts, tmp_path):
    path = copy_checkpoint(ckpts["mixtral-e3-top1"], tmp_path / "c")
    _rewrite(path, change={"model.layers.0.block_sparse_moe.experts.1.w2.weight": torch.zeros(64, 31)})
    with pytest.raises(CheckpointError, match=r"experts\.1\.w2\.weight has shape \[64, 31\], expected \[64, 32\]"):
        Checkpoint.open(path)


def test_fused_expert_checkpoint_is_refused_by_name(ckpts, tmp_path):
    path = copy_checkpoint(ckpts["qwen3_moe-e7-top2-norm"], tmp_path / "c")
    _rewrite(path, change={"model.layers.0.mlp.experts.gate_up_proj": torch.zeros(7, 64, 64)})
    with pytest.raises(CheckpointError, match="holds every expert of a layer fused"):
        Checkpoint.open(path)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"num_experts_per_tok": 9}, r"num_experts_per_tok must be in \[1, 7\], got 9"),
        ({"num_experts": 0, "num_local_experts": 0}, "needs num_experts"),
        ({"moe_intermediate_size": None}, "needs moe_intermediate_size >= 1"),
        ({"decoder_sparse_step": 0}, "decoder_sparse_step must be >= 1"),
    ],
)
def test_bad_moe_config_fields(ckpts, tmp_path, change, message):
    path = copy_checkpoint(ckpts["qwen3_moe-e7-top2-norm"], tmp_path / "c")
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, **change}))
    with pytest.raises(CheckpointError, match=message):
        Checkpoint.open(path)


def test_decoder_sparse_step_and_mlp_only_layers():
    base = {"architectures": ["Qwen2MoeForCausalLM"], "vocab_size": 8, "hidden_size": 8, "intermediate_size": 8,
            "num_hidden_layers": 6, "num_attention_heads": 2, "num_experts": 3, "moe_intermediate_size": 4}  # fmt: skip
    assert ModelConfig.from_hf(base).moe_layers == tuple(range(6))
    assert ModelConfig.from_hf({**base, "decoder_sparse_step": 2}).moe_layers == (1, 3, 5)
    assert ModelConfig.from_hf({**base, "decoder_sparse_step": 2, "mlp_only_layers": [3]}).moe_layers == (1, 5)
    c = ModelConfig.from_hf(base)
    assert c.qkv_bias and not c.norm_topk_prob and c.num_experts_per_tok == 2  # transformers' defaults
    with pytest.raises(ConfigError, match="num_experts_per_tok"):
        ModelConfig.from_hf({**base, "num_experts_per_tok": 4})
