#!/usr/bin/env python3
"""Train aioffload's embedded demo model from scratch, on the CPU.

The corpus is the reStructuredText source of the Python 3.11 documentation as shipped
by the Debian package ``python3.11-doc`` (``/usr/share/doc/python3.11/html/_sources``),
licensed under the PSF License Agreement (see the package's ``copyright`` file). The
script fetches the package itself (``apt-get download`` + ``dpkg -x`` into a temporary
directory), turns the reST into plain prose paragraphs, holds out one document
(``tutorial/appetite``) for evaluation, trains a byte-level BPE tokenizer and a small
Llama model, and writes everything into ``aioffload/assets/demo/``:

    config.json  generation_config.json  model.safetensors
    tokenizer.json  tokenizer_config.json  heldout.txt

Usage:  python scripts/train_demo.py --minutes 15
(options: --deb PATH to use an already downloaded .deb, --out DIR, --seed N)
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

PACKAGE = "python3.11-doc"
SOURCES_DIR = "usr/share/doc/python3.11/html/_sources"
COPYRIGHT = "usr/share/doc/python3.11-doc/copyright"
HELDOUT_DOC = "tutorial/appetite.rst.txt"
SPECIAL_TOKENS = ["<|bos|>", "<|eos|>", "<|user|>", "<|assistant|>", "<|system|>"]
VOCAB_SIZE = 4096
REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "aioffload" / "assets" / "demo"

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] | trim + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


# --------------------------------------------------------------------------- corpus
def fetch_package(workdir: Path, deb: str | None) -> tuple[Path, str]:
    """Download (unless given) and unpack the Debian package; return (root, version)."""
    if deb is None:
        subprocess.run(["apt-get", "download", PACKAGE], cwd=workdir, check=True,
                       stdout=subprocess.DEVNULL)
        debs = sorted(workdir.glob(f"{PACKAGE}_*.deb"))
        if not debs:
            sys.exit(f"apt-get download {PACKAGE} produced no .deb")
        deb = str(debs[-1])
    version = subprocess.run(["dpkg-deb", "-f", deb, "Version"], check=True,
                             capture_output=True, text=True).stdout.strip()
    root = workdir / "pkg"
    subprocess.run(["dpkg", "-x", deb, str(root)], check=True)
    return root, version


_ROLE = re.compile(r":[a-zA-Z:+\-]+:`([^`]*)`")
_TARGET = re.compile(r"^(.*?)\s*<[^<>]*>$", re.S)


def _role_text(m: re.Match) -> str:
    text = m.group(1).lstrip("!~")
    t = _TARGET.match(text)
    if t and t.group(1):
        text = t.group(1)
    return text


def inline_to_text(s: str) -> str:
    s = _ROLE.sub(_role_text, s)
    s = re.sub(r"``([^`]*)``", r"\1", s)
    s = re.sub(r"`([^`<]*?)\s*(<[^>]*>)?`_{1,2}", r"\1", s)   # `link <url>`_
    s = re.sub(r"`([^`]*)`", r"\1", s)
    s = re.sub(r"\*\*([^*]+)\*\*", r"\1", s)
    s = re.sub(r"(?<![\w*])\*([^*\s][^*]*)\*(?![\w*])", r"\1", s)
    s = re.sub(r"\[\#?\w*\]_", "", s)       # footnote refs
    s = re.sub(r"\|(\w+)\|", r"\1", s)        # substitutions
    s = s.replace("\\", "")
    s = re.sub(r"\s+", " ", s).strip()
    if s.endswith("::"):
        s = s[:-2].rstrip() + ":"
    s = s.replace(" ::", ":").replace(":: ", ": ")
    return s


_UNDERLINE = re.compile(r"^([=\-~^\"'`#*+.])\1{2,}\s*$")


def rst_to_paragraphs(text: str) -> list[str]:
    """Keep unindented prose paragraphs; drop headings, directives, code, tables."""
    paras: list[str] = []
    cur: list[str] = []

    def flush() -> None:
        if cur:
            p = inline_to_text(" ".join(cur))
            # keep real sentences: enough words, mostly letters
            letters = sum(c.isalpha() or c.isspace() for c in p)
            if len(p.split()) >= 6 and letters / max(1, len(p)) > 0.8:
                paras.append(p)
            cur.clear()

    lines = text.splitlines()
    for i, line in enumerate(lines):
        nxt = lines[i + 1] if i + 1 < len(lines) else ""
        if not line.strip():
            flush()
            continue
        if line[0].isspace():              # indented: code, directive bodies, lists
            flush()
            continue
        if _UNDERLINE.match(line) or _UNDERLINE.match(nxt):   # heading or its rule
            flush()
            continue
        s = line.strip()
        if s.startswith((".. ", "..\t", "|", "+-", "+=", ">>>", "* ", "- ", "#. ")) or \
                re.match(r"^\d+\.\s", s) or s == "..":
            flush()
            continue
        cur.append(s)
    flush()
    return paras


def load_corpus(root: Path) -> tuple[list[str], str]:
    src = root / SOURCES_DIR
    docs: list[str] = []
    heldout = ""
    for path in sorted(glob.glob(str(src / "**" / "*.rst.txt"), recursive=True)):
        rel = os.path.relpath(path, src)
        if rel.startswith(("includes", "license", "copyright")):
            continue
        paras = rst_to_paragraphs(Path(path).read_text(encoding="utf-8", errors="replace"))
        if not paras:
            continue
        doc = "\n\n".join(paras)
        if rel == HELDOUT_DOC:
            heldout = doc
        else:
            docs.append(doc)
    if not heldout:
        sys.exit(f"held-out document {HELDOUT_DOC} not found")
    return docs, heldout


# --------------------------------------------------------------------------- tokenizer
def train_tokenizer(docs: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, special_tokens=SPECIAL_TOKENS, min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(docs, trainer=trainer)
    bos = tok.token_to_id("<|bos|>")
    tok.post_processor = processors.TemplateProcessing(
        single="<|bos|> $A", pair="<|bos|> $A <|bos|> $B", special_tokens=[("<|bos|>", bos)])
    return tok


def write_tokenizer_files(tok, out: Path) -> dict[str, int]:
    tok.save(str(out / "tokenizer.json"))
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|bos|>",
        "eos_token": "<|eos|>",
        "pad_token": "<|eos|>",
        "add_bos_token": True,
        "add_eos_token": False,
        "model_max_length": 1024,
        "clean_up_tokenization_spaces": False,
        "additional_special_tokens": ["<|user|>", "<|assistant|>", "<|system|>"],
        "chat_template": CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return ids


# --------------------------------------------------------------------------- model
def make_model(ids: dict[str, int]):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=VOCAB_SIZE, hidden_size=256, intermediate_size=768,
        num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
        max_position_embeddings=1024, rope_theta=10000.0, rms_norm_eps=1e-5,
        tie_word_embeddings=True, hidden_act="silu", initializer_range=0.02,
        bos_token_id=ids["<|bos|>"], eos_token_id=ids["<|eos|>"],
        pad_token_id=ids["<|eos|>"], attention_bias=False, mlp_bias=False,
    )
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg)


@torch.no_grad()
def eval_loss(model, ids: list[int], seq: int) -> float:
    model.eval()
    total, n = 0.0, 0
    for s in range(0, len(ids) - 1, seq):
        chunk = torch.tensor(ids[s:s + seq + 1])[None]
        if chunk.shape[1] < 2:
            break
        out = model(input_ids=chunk[:, :-1], labels=None)
        logits = out.logits.float()
        loss = torch.nn.functional.cross_entropy(
            logits[0], chunk[0, 1:], reduction="sum")
        total += loss.item()
        n += chunk.shape[1] - 1
    model.train()
    return total / max(1, n)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--minutes", type=float, default=15.0, help="training wall-time budget")
    ap.add_argument("--deb", default=None, help="use this python3.11-doc .deb")
    ap.add_argument("--out", default=str(DEFAULT_OUT))
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="demo_corpus_") as tmp:
        root, version = fetch_package(Path(tmp), args.deb)
        docs, heldout = load_corpus(root)
    n_chars = sum(len(d) for d in docs)
    print(f"corpus: Debian {PACKAGE} {version} (PSF License), {len(docs)} documents, "
          f"{n_chars / 1e6:.2f} MB of prose; held-out {HELDOUT_DOC}: {len(heldout)} chars",
          flush=True)

    tok = train_tokenizer(docs)
    ids = write_tokenizer_files(tok, out)
    heldout += "\n"
    (out / "heldout.txt").write_text(heldout)
    print(f"tokenizer: vocab {tok.get_vocab_size()}, special {ids} "
          f"({time.time() - t0:.0f}s)", flush=True)

    bos, eos = ids["<|bos|>"], ids["<|eos|>"]
    stream: list[int] = []
    for enc in tok.encode_batch(docs, add_special_tokens=False):
        stream.append(bos)
        stream.extend(enc.ids)
        stream.append(eos)
    data = torch.tensor(stream, dtype=torch.long)
    held_ids = [bos] + tok.encode(heldout, add_special_tokens=False).ids
    print(f"train tokens: {len(data)}  ({n_chars / len(data):.2f} chars/token); "
          f"held-out tokens: {len(held_ids)}", flush=True)

    model = make_model(ids)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f} M parameters", flush=True)

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), eps=1e-8)
    budget = args.minutes * 60.0
    warmup = 40
    min_ratio = 0.05
    seq, bsz = args.seq, args.batch
    n_windows = len(data) - seq - 1
    model.train()
    t_train = time.time()
    step, ema = 0, None
    while True:
        elapsed = time.time() - t_train
        if elapsed >= budget:
            break
        progress = min(1.0, elapsed / budget)        # cosine over wall time
        lr = args.lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))
        if step < warmup:
            lr = lr * (step + 1) / warmup
        for g in opt.param_groups:
            g["lr"] = lr
        starts = torch.randint(0, n_windows, (bsz,))
        batch = torch.stack([data[s:s + seq + 1] for s in starts.tolist()])
        out_ = model(input_ids=batch[:, :-1], labels=None)
        loss = torch.nn.functional.cross_entropy(
            out_.logits.reshape(-1, VOCAB_SIZE).float(), batch[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        if step % 50 == 0:
            tps = step * bsz * seq / (time.time() - t_train)
            print(f"step {step:5d}  loss {loss.item():.3f}  ema {ema:.3f}  lr {lr:.2e}  "
                  f"{tps:.0f} tok/s  {elapsed / 60:.1f} min", flush=True)
    train_time = time.time() - t_train
    tokens_seen = step * bsz * seq

    # same definition as tests/test_demo_model.py: one pass over the first 1024 tokens
    held_loss = eval_loss(model, held_ids[:1024], 1024)
    uniform = math.log(VOCAB_SIZE)

    # save: drop everything not needed, keep float32 (about 17 MB)
    for f in ("model.safetensors", "config.json", "generation_config.json"):
        (out / f).unlink(missing_ok=True)
    model.save_pretrained(str(out), safe_serialization=True)
    # transformers 5 writes rope_parameters only; keep the classic key for other loaders
    cfg_path = out / "config.json"
    cfg_json = json.loads(cfg_path.read_text())
    cfg_json.setdefault("rope_theta", model.config.rope_parameters["rope_theta"]
                        if getattr(model.config, "rope_parameters", None) else 10000.0)
    cfg_path.write_text(json.dumps(cfg_json, indent=2, sort_keys=True) + "\n")
    gen = {"bos_token_id": bos, "eos_token_id": eos, "pad_token_id": eos,
           "do_sample": False, "max_new_tokens": 64}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    os.chmod(out / "model.safetensors", 0o644)   # safetensors writes 0600
    keep = {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
            "tokenizer_config.json", "heldout.txt"}
    for p in out.iterdir():
        if p.name not in keep:
            shutil.rmtree(p) if p.is_dir() else p.unlink()

    print(f"trained {step} steps, {tokens_seen / 1e6:.2f} M tokens in {train_time / 60:.1f} min")
    print(f"final train loss (ema): {ema:.3f}")
    print(f"held-out loss ({min(1024, len(held_ids)) - 1} tokens): {held_loss:.3f}")
    print(f"uniform loss ln({VOCAB_SIZE}): {uniform:.3f}")

    from transformers import AutoTokenizer
    hf_tok = AutoTokenizer.from_pretrained(str(out))
    model.eval()
    for prompt in ("The", "In the beginning", "Python is"):
        enc = hf_tok(prompt, return_tensors="pt")
        with torch.no_grad():
            g = model.generate(**enc, max_new_tokens=40, do_sample=False,
                               pad_token_id=eos)
        print(f"[greedy] {prompt!r} -> {hf_tok.decode(g[0], skip_special_tokens=True)!r}")


if __name__ == "__main__":
    main()
