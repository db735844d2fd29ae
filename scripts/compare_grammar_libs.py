"""Compare xgrammar, llguidance and outlines-core for constrained JSON decoding on our tokenizers.

    python scripts/compare_grammar_libs.py [--llama3-vocab 128000] [--out measure/grammar-libs.json]

Tokenizers: the demo model's (byte-level BPE, 4096 ids) and a Llama-3-style one (byte-level BPE with
Llama-3's split regex and 256 reserved specials, trained here on Python sources so no download is
needed; cached under /tmp). For every library and each schema of tests/data/json_schemas.json:
compile time, then a walk of up to --max-tokens steps where each step computes the vocabulary
bitmask, takes the argmax of seeded random logits among allowed ids, and advances; the output must
parse and validate (jsonschema). Reported: tokenizer set-up, compile time, mask time per token
(mean and p99), and how many walks gave valid JSON. Prints a table; writes JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from aioffload.serving.logprobs import byte_decoder
from aioffload.worker.masks import unpack_bitmask

REPO = Path(__file__).resolve().parent.parent
DEMO_TOKENIZER = REPO / "aioffload" / "assets" / "demo" / "tokenizer.json"
SCHEMAS = json.loads((REPO / "tests" / "data" / "json_schemas.json").read_text())
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)


def llama3_style(vocab: int, corpus_mb: int) -> Path:
    path = Path(f"/tmp/aioffload-llama3-style-{vocab}.json")
    if path.exists():
        return path
    files = sorted(Path(torch.__file__).parent.parent.rglob("*.py"))
    texts, size = [], 0
    for f in files:
        if size > corpus_mb << 20:
            break
        t = f.read_text(errors="ignore")
        texts.append(t)
        size += len(t)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(pattern=__import__("tokenizers").Regex(LLAMA3_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])  # fmt: skip
    tok.decoder = decoders.ByteLevel()
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"] + [f"<|reserved_{i}|>" for i in range(253)]
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    tok.save(str(path))
    return path


def byte_vocab(tok: Tokenizer) -> list[bytes]:
    """Each id's bytes (byte-level BPE: map the GPT-2 alphabet back); specials as their text."""
    byte_of = byte_decoder()
    added = {t.content for t in tok.get_added_tokens_decoder().values()}
    out = []
    for i in range(tok.get_vocab_size(with_added_tokens=True)):
        piece = tok.id_to_token(i) or ""
        out.append(piece.encode() if piece in added else bytes(byte_of[c] for c in piece))
    return out


class Lib:
    """One library behind one interface: compile(schema) -> matcher; fill(matcher, mask row); accept."""

    name: str

    def setup(self, tok_json: str, vocab: list[bytes], eos: int) -> None: ...
    def compile(self, schema: dict[str, Any]) -> Any: ...
    def fill(self, m: Any) -> None: ...  # compute the next-token mask (the timed part)
    def allowed(self, m: Any, out: torch.Tensor) -> None: ...  # the mask just filled, as bool [V]
    def accept(self, m: Any, token: int) -> None: ...
    def done(self, m: Any) -> bool: ...


class XGrammar(Lib):
    name = "xgrammar"

    def setup(self, tok_json: str, vocab: list[bytes], eos: int) -> None:
        import xgrammar as xgr

        self.xgr = xgr
        info = xgr.TokenizerInfo(vocab, vocab_type=xgr.VocabType.RAW, vocab_size=len(vocab),
                                 stop_token_ids=[eos])
        self.compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
        self.bitmask = xgr.allocate_token_bitmask(1, len(vocab))
        self.vocab_size = len(vocab)

    def compile(self, schema: dict[str, Any]) -> Any:
        cg = self.compiler.compile_json_schema(json.dumps(schema), any_whitespace=False)
        return self.xgr.GrammarMatcher(cg)

    def fill(self, m: Any) -> None:
        m.fill_next_token_bitmask(self.bitmask, 0)

    def allowed(self, m: Any, out: torch.Tensor) -> None:
        out.copy_(unpack_bitmask(self.bitmask[:1], self.vocab_size)[0])

    def accept(self, m: Any, token: int) -> None:
        assert m.accept_token(token)

    def done(self, m: Any) -> bool:
        return m.is_terminated()


class LLGuidance(Lib):
    name = "llguidance"

    def setup(self, tok_json: str, vocab: list[bytes], eos: int) -> None:
        import llguidance
        import llguidance.torch

        self.ll = llguidance
        self.fill_bitmask = llguidance.torch.fill_next_token_bitmask
        self.tok = llguidance.LLTokenizer(tok_json, n_vocab=len(vocab), eos_token=eos)
        self.bitmask = llguidance.torch.allocate_token_bitmask(1, len(vocab))
        self.vocab_size = len(vocab)

    def compile(self, schema: dict[str, Any]) -> Any:
        grammar = self.ll.LLMatcher.grammar_from_json_schema(
            schema, defaults={"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "})
        m = self.ll.LLMatcher(self.tok, grammar, log_level=0)
        assert not m.is_error(), m.get_error()
        return m

    def fill(self, m: Any) -> None:
        self.fill_bitmask(m, self.bitmask, 0)

    def allowed(self, m: Any, out: torch.Tensor) -> None:
        out.copy_(unpack_bitmask(self.bitmask[:1], self.vocab_size)[0])

    def accept(self, m: Any, token: int) -> None:
        assert m.consume_token(token), m.get_error()

    def done(self, m: Any) -> bool:
        return m.is_stopped()


class OutlinesCore(Lib):
    name = "outlines-core"

    def setup(self, tok_json: str, vocab: list[bytes], eos: int) -> None:
        import outlines_core

        self.oc = outlines_core
        mapping: dict[bytes, list[int]] = {}
        for i, b in enumerate(vocab):
            if i != eos and b:
                mapping.setdefault(b, []).append(i)
        self.vocab = outlines_core.Vocabulary(eos, mapping)
        self.vocab_size = len(vocab)

    def compile(self, schema: dict[str, Any]) -> Any:
        regex = self.oc.json_schema.build_regex_from_schema(json.dumps(schema), whitespace_pattern=r"[ ]?")
        return self.oc.Guide(self.oc.Index(regex, self.vocab))

    def fill(self, m: Any) -> None:
        self.tokens = m.get_tokens()

    def allowed(self, m: Any, out: torch.Tensor) -> None:
        out.zero_()
        out[torch.tensor(self.tokens, dtype=torch.long)] = True

    def accept(self, m: Any, token: int) -> None:
        m.advance(token)

    def done(self, m: Any) -> bool:
        return m.is_finished()


def walk(lib: Lib, schema: dict[str, Any], decode: Callable[[list[int]], str], vocab: int, eos: int,
         seed: int, max_tokens: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    m = lib.compile(schema)
    compile_s = time.perf_counter() - t0
    gen = torch.Generator().manual_seed(seed)
    allowed = torch.zeros(vocab, dtype=torch.bool)
    ids, mask_s, finished = [], [], False
    for _ in range(max_tokens):
        t = time.perf_counter()
        lib.fill(m)
        mask_s.append(time.perf_counter() - t)
        lib.allowed(m, allowed)
        logits = torch.randn(vocab, generator=gen).masked_fill_(~allowed, float("-inf"))
        token = int(logits.argmax())
        if token == eos or not allowed[token]:
            finished = token == eos
            break
        lib.accept(m, token)
        ids.append(token)
        if lib.done(m):
            finished = True
            break
    text = decode(ids)
    try:
        jsonschema.validate(json.loads(text), schema)
        valid = True
    except (ValueError, jsonschema.ValidationError):
        valid = False
    return {"compile_s": compile_s, "mask_s": mask_s, "valid": valid, "finished": finished, "tokens": len(ids),
            "text": text}


def run(lib: Lib, tok_path: Path, max_tokens: int, seeds: int) -> dict[str, Any]:
    tok = Tokenizer.from_file(str(tok_path))
    vocab = byte_vocab(tok)
    eos = next(i for i in range(len(vocab)) if vocab[i] in (b"<|eos|>", b"<|end_of_text|>"))
    t0 = time.perf_counter()
    lib.setup(tok_path.read_text(), vocab, eos)  # imports are done before (main)
    setup_s = time.perf_counter() - t0
    walks, failures = [], []
    for name, schema in SCHEMAS.items():
        for seed in range(seeds):
            try:
                w = walk(lib, schema, lambda ids: tok.decode(ids), len(vocab), eos, seed, max_tokens)
            except Exception as e:  # a schema the library cannot compile, or a matcher error
                failures.append(f"{name}: {type(e).__name__}: {str(e)[:120]}")
                continue
            walks.append(w)
            if not w["valid"]:
                kind = "invalid" if w["finished"] else f"unfinished after {max_tokens} tokens"
                failures.append(f"{name} seed {seed}: {kind} {w['text'][:80]!r}")
    masks = sorted(s for w in walks for s in w["mask_s"])
    compiles = [w["compile_s"] for w in walks]
    return {
        "library": lib.name, "tokenizer": tok_path.name, "vocab": len(vocab), "setup_s": setup_s,
        "compile_ms_mean": 1e3 * statistics.mean(compiles) if compiles else None,
        "compile_ms_max": 1e3 * max(compiles) if compiles else None,
        "mask_us_mean": 1e6 * statistics.mean(masks) if masks else None,
        "mask_us_p99": 1e6 * masks[int(0.99 * (len(masks) - 1))] if masks else None,
        "walks": len(SCHEMAS) * seeds, "valid": sum(w["valid"] for w in walks),
        "invalid": sum(w["finished"] and not w["valid"] for w in walks),
        "unfinished": sum(not w["finished"] for w in walks), "failures": failures,
    }  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llama3-vocab", type=int, default=128000)
    ap.add_argument("--corpus-mb", type=int, default=48)
    ap.add_argument("--max-tokens", type=int, default=300)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--libs", default="xgrammar,llguidance,outlines-core")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    libs = {c.name: c for c in (XGrammar, LLGuidance, OutlinesCore)}
    modules = {"xgrammar": ["xgrammar"], "llguidance": ["llguidance", "llguidance.torch"],
               "outlines-core": ["outlines_core"]}
    for name in args.libs.split(","):
        t0 = time.perf_counter()
        for module in modules[name]:
            __import__(module)
        print(f"import {name}: {time.perf_counter() - t0:.2f} s", file=sys.stderr)
    t0 = time.perf_counter()
    tokenizers_ = [DEMO_TOKENIZER, llama3_style(args.llama3_vocab, args.corpus_mb)]
    print(f"tokenizers ready in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    rows = []
    for tok_path in tokenizers_:
        for name in args.libs.split(","):
            row = run(libs[name](), tok_path, args.max_tokens, args.seeds)
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "failures"}), file=sys.stderr)
    print(f"\n{'library':14} {'tokenizer':34} {'vocab':>7} {'setup s':>8} {'compile ms':>16} "
          f"{'mask us/token':>16} {'valid':>7} {'invalid':>7} {'unfinished':>10}")
    for r in rows:
        comp = f"{r['compile_ms_mean']:.1f} / {r['compile_ms_max']:.0f}" if r["compile_ms_mean"] else "-"
        mask = f"{r['mask_us_mean']:.0f} / {r['mask_us_p99']:.0f}" if r["mask_us_mean"] else "-"
        print(f"{r['library']:14} {r['tokenizer']:34} {r['vocab']:>7} {r['setup_s']:>8.2f} {comp:>16} {mask:>16} "
              f"{r['valid']:>3}/{r['walks']:<3} {r['invalid']:>7} {r['unfinished']:>10}")
    print("compile: mean / max over schemas; mask: the library's fill call, mean / p99 per token, one request, "
          "one thread; invalid: finished but does not parse or validate; unfinished: still writing at --max-tokens")
    for r in rows:
        for f in r["failures"][:8]:
            print(f"  {r['library']} {r['tokenizer']}: {f}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
