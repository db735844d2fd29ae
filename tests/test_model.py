"""Our decoder against Hugging Face transformers on tiny random checkpoints."""

from __future__ import annotations

import pytest
import torch

from aioffload.attention.backends import SdpaBackend
from aioffload.attention.kv_cache import BlockManager, BlockPool, KVCache
from aioffload.checkpoint.checkpoint import Checkpoint
from aioffload.worker.inputs import SeqChunk, build_inputs
from aioffload.worker.model_loader import build_model
from tests.tiny_models import ARCHS, make_checkpoint

CPU = torch.device("cpu")


def hf_model(path):
    import transformers as tf

    return tf.AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()


def run_ours(path, prompts, decode_steps, chunk=None, offloaded=frozenset(), ring=2):
    """Prefill `prompts` (in chunks of `chunk` tokens if given) then greedy-decode; returns
    (prefill last-token logits [S, V], decode logits per step, generated ids)."""
    ckpt = Checkpoint.open(path)
    cfg = ckpt.model_config
    model, _ = build_model(ckpt, torch.float32, CPU, SdpaBackend(), 512, offloaded=offloaded, ring_size=ring)
    bm = BlockManager(BlockPool(64, 4))
    kv = KVCache(cfg.num_layers, 64, 4, cfg.num_kv_heads, cfg.head_dim, torch.float32, CPU)
    seqs = [list(p) for p in prompts]
    done = [0] * len(seqs)
    prefill_logits = [None] * len(seqs)
    while any(d < len(s) for d, s in zip(done, seqs)):
        chunks, idx = [], []
        for i, s in enumerate(seqs):
            if done[i] < len(s):
                n = len(s) - done[i] if chunk is None else min(chunk, len(s) - done[i])
                bm.allocate_slots(i, done[i] + n)
                chunks.append(SeqChunk(s[done[i] : done[i] + n], done[i], bm.block_table(i)))
                idx.append((i, n))
        inp = build_inputs(chunks, 4, CPU)
        logits = model.forward(inp.input_ids, inp.positions, inp.meta, kv)
        for row, (i, n) in enumerate(idx):
            done[i] += n
            if done[i] == len(seqs[i]):
                prefill_logits[i] = logits[row]
    out_logits, gen = [], [[] for _ in seqs]
    nxt = [int(lg.argmax()) for lg in prefill_logits]
    for _ in range(decode_steps):
        chunks = []
        for i, s in enumerate(seqs):
            s.append(nxt[i])
            gen[i].append(nxt[i])
            bm.allocate_slots(i, len(s))
            chunks.append(SeqChunk([nxt[i]], len(s) - 1, bm.block_table(i)))
        inp = build_inputs(chunks, 4, CPU)
        logits = model.forward(inp.input_ids, inp.positions, inp.meta, kv)
        out_logits.append(logits)
        nxt = [int(x) for x in logits.argmax(-1)]
    return torch.stack(prefill_logits), out_logits, gen


PROMPTS = [[1, 5, 9, 33, 7, 100, 3], [1, 200, 201, 17], [1, 42] * 9]


@pytest.mark.parametrize("arch", ARCHS)
def test_logits_match_transformers(tmp_path, arch):
    path = make_checkpoint(tmp_path, arch, tie=arch == "qwen2")
    hf = hf_model(path)
    pre, dec, gen = run_ours(path, PROMPTS, decode_steps=4)
    with torch.no_grad():
        for i, p in enumerate(PROMPTS):
            full = p + gen[i]
            ref = hf(torch.tensor([full])).logits[0].float()
            diff = (pre[i] - ref[len(p) - 1]).abs().max().item()
            assert diff < 1e-4, f"{arch} prefill seq {i}: max abs diff {diff}"
            for step, lg in enumerate(dec):
                d = (lg[i] - ref[len(p) + step]).abs().max().item()
                assert d < 1e-4, f"{arch} decode step {step} seq {i}: max abs diff {d}"


@pytest.mark.parametrize("arch", ["llama3", "qwen3"])
def test_chunked_prefill_matches_whole_prefill(tmp_path, arch):
    path = make_checkpoint(tmp_path, arch)
    pre_a, dec_a, gen_a = run_ours(path, PROMPTS, decode_steps=3)
    pre_b, dec_b, gen_b = run_ours(path, PROMPTS, decode_steps=3, chunk=3)
    assert gen_a == gen_b
    assert (pre_a - pre_b).abs().max().item() < 1e-5


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3"])
def test_greedy_32_tokens_equal_transformers_generate(tmp_path, arch):
    path = make_checkpoint(tmp_path, arch, seed=3)
    hf = hf_model(path)
    prompt = [1, 17, 99, 4, 250, 8]
    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=32, min_new_tokens=32, do_sample=False)[0]
    _, _, gen = run_ours(path, [prompt], decode_steps=31)
    pre, _, _ = run_ours(path, [prompt], decode_steps=0)
    ours = [int(pre[0].argmax())] + gen[0][1:] + []
    # gen[0] holds tokens fed back during decode: first = argmax of prefill, then 30 more; the 32nd is the
    # argmax of the last decode logits, recomputed here for a full 32-token comparison.
    _, dec, gen_full = run_ours(path, [prompt], decode_steps=31)
    ours = gen_full[0] + [int(dec[-1][0].argmax())]
    assert ours == ref[len(prompt) :].tolist()
