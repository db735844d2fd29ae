"""The embedded demo model (aioffload/assets/demo) is a trained language model, not noise.

It is trained by scripts/train_demo.py on the Python 3.11 documentation (Debian python3.11-doc,
PSF License); heldout.txt is a document the model never saw during training.
"""

from __future__ import annotations

import json
import math
import string
from pathlib import Path

import pytest
import torch

from aioffload.config import DEMO_MODEL

transformers = pytest.importorskip("transformers")

DEMO = Path(DEMO_MODEL)
EXPECTED_FILES = ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                  "tokenizer_config.json", "heldout.txt"]


@pytest.fixture(scope="module")
def demo():
    # The model is tiny: one thread avoids OpenMP oversubscription on busy CI hosts.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    tok = transformers.PreTrainedTokenizerFast.from_pretrained(str(DEMO))
    model = transformers.LlamaForCausalLM.from_pretrained(str(DEMO)).float()
    model.eval()
    yield tok, model
    torch.set_num_threads(threads)


def test_demo_files_present():
    missing = [f for f in EXPECTED_FILES if not (DEMO / f).is_file()]
    assert not missing, f"missing demo files: {missing}"
    cfg = json.loads((DEMO / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert (DEMO / "model.safetensors").stat().st_size <= 32 * 1024 * 1024
    tcfg = json.loads((DEMO / "tokenizer_config.json").read_text())
    gen = json.loads((DEMO / "generation_config.json").read_text())
    assert tcfg["add_bos_token"] is True
    assert gen["bos_token_id"] == cfg["bos_token_id"]
    assert gen["eos_token_id"] == cfg["eos_token_id"]


def test_tokenizer_round_trip_and_chat_template(demo):
    tok, model = demo
    text = "Python is a programming language. It's easy:  x = [1, 2]\n\tdone"
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.bos_token_id == model.config.bos_token_id
    assert tok.decode(ids, skip_special_tokens=True) == text
    rendered = tok.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        tokenize=False, add_generation_prompt=True)
    assert rendered == "<|bos|><|system|>Be brief.\n<|user|>Hi\n<|assistant|>"
    for t in ("<|bos|>", "<|eos|>", "<|user|>", "<|assistant|>", "<|system|>"):
        assert len(tok(t, add_special_tokens=False)["input_ids"]) == 1, t


def test_heldout_loss_far_below_uniform(demo):
    tok, model = demo
    text = (DEMO / "heldout.txt").read_text()
    ids = tok(text, return_tensors="pt")["input_ids"][:, :1024]
    assert ids.shape[1] >= 512, "held-out passage too short"
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss.item()
    uniform = math.log(model.config.vocab_size)
    assert loss < 0.65 * uniform, (
        f"held-out loss {loss:.3f} is not far below the uniform loss ln(V) = {uniform:.3f}")


def greedy(model, ids: list[int], n: int) -> list[int]:
    """Plain greedy decoding (argmax, full recompute: the model and the prompts are tiny)."""
    ids = list(ids)
    out = []
    with torch.no_grad():
        for _ in range(n):
            nxt = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
            if nxt == model.config.eos_token_id:
                break
            ids.append(nxt)
            out.append(nxt)
    return out


def test_greedy_continuation_is_wordlike(demo):
    tok, model = demo
    allowed = set(string.ascii_letters + string.punctuation)
    for prompt in ("The", "Python is"):
        cont = tok.decode(greedy(model, tok(prompt)["input_ids"], 40), skip_special_tokens=True)
        words = cont.split()
        assert len(words) >= 10, f"continuation too short: {cont!r}"
        good = sum(all(c in allowed for c in w) and any(c.isalpha() for c in w) for w in words)
        assert good >= 0.7 * len(words), f"{prompt!r} -> {cont!r}: only {good}/{len(words)} words"
        distinct = len(set(w.lower() for w in words))
        assert distinct >= 5, f"{prompt!r} -> {cont!r}: degenerate repetition"
