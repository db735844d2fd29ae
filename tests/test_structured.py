"""Constrained decoding on the demo tokenizer: a greedy walk restricted by the matcher's mask, over
random logits and over the demo model's own logits, always gives JSON that parses and validates,
for each of 20 schemas (tests/data/json_schemas.json)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import torch

from aioffload.checkpoint.tokenizer import Tokenizer
from aioffload.config import DEMO_MODEL
from aioffload.worker.masks import allocate_bitmask, apply_bitmask, unpack_bitmask
from aioffload.worker.structured import GrammarCompiler, GrammarSpec, Matcher, StructuredOutputError

DEMO = Path(DEMO_MODEL)
SCHEMAS: dict[str, dict[str, Any]] = json.loads((Path(__file__).parent / "data" / "json_schemas.json").read_text())
MAX_TOKENS = 400


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_dir(DEMO)


@pytest.fixture(scope="module")
def compiler(tokenizer: Tokenizer) -> GrammarCompiler:
    return GrammarCompiler.for_tokenizer(tokenizer, tokenizer.vocab_size, tokenizer.eos_token_ids)


def greedy_walk(matcher: Matcher, next_logits: Callable[[list[int]], torch.Tensor], eos: tuple[int, ...],
                vocab: int) -> tuple[list[int], bool]:
    """Argmax of the masked logits until eos; (token ids, whether it ended with eos)."""
    bitmask = allocate_bitmask(1, vocab)
    ids: list[int] = []
    for _ in range(MAX_TOKENS):
        matcher.fill(bitmask, 0)
        logits = next_logits(ids).reshape(1, vocab).clone()
        apply_bitmask(logits, bitmask)
        token = int(logits.argmax())
        if token in eos:
            assert matcher.is_accepting
            return ids, True
        matcher.accept(token)
        ids.append(token)
    return ids, False


def check(text: str, schema: dict[str, Any]) -> Any:
    value = json.loads(text)  # strict: control characters in strings would fail here
    jsonschema.validate(value, schema)
    return value


def test_the_suite_has_20_schemas_of_every_kind() -> None:
    assert len(SCHEMAS) == 20
    text = json.dumps(SCHEMAS)
    for keyword in ('"enum"', '"minimum"', '"maximum"', '"exclusiveMinimum"', '"items"', '"$ref"', '"anyOf"',
                    '"pattern"', '"const"', '"type": "number"'):
        assert keyword in text


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_random_logits_walk_validates(name: str, seed: int, tokenizer: Tokenizer, compiler: GrammarCompiler) -> None:
    schema = SCHEMAS[name]
    gen = torch.Generator().manual_seed(seed)
    matcher = compiler.compile(GrammarSpec.json_schema(schema))
    ids, ended = greedy_walk(matcher, lambda _: torch.randn(tokenizer.vocab_size, generator=gen),
                             tokenizer.eos_token_ids, tokenizer.vocab_size)
    assert ended and matcher.is_finished, tokenizer.decode(ids)
    check(tokenizer.decode(ids), schema)


@pytest.fixture(scope="module")
def demo_model() -> Any:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_pretrained(DEMO, dtype=torch.float32).eval()


def model_logits(model: Any, prompt: list[int]) -> Callable[[list[int]], torch.Tensor]:
    """next_logits(ids so far) from the demo model, with its KV cache (one forward per new token)."""
    state: dict[str, Any] = {"past": None, "fed": 0}

    @torch.no_grad()
    def next_logits(ids: list[int]) -> torch.Tensor:
        seq = prompt + ids
        new = torch.tensor([seq[state["fed"]:]])
        out = model(input_ids=new, cache=state["past"], use_cache=True)
        state["past"], state["fed"] = out.cache, len(seq)
        return out.logits[0, -1].float()

    return next_logits


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_demo_model_walk_validates(name: str, tokenizer: Tokenizer, compiler: GrammarCompiler,
                                   demo_model: Any) -> None:
    schema = SCHEMAS[name]
    prompt = tokenizer.encode(f"Return a JSON value for this schema: {json.dumps(schema)[:200]}\n")
    matcher = compiler.compile(GrammarSpec.json_schema(schema))
    ids, ended = greedy_walk(matcher, model_logits(demo_model, prompt), tokenizer.eos_token_ids,
                             tokenizer.vocab_size)
    assert ended, tokenizer.decode(ids)
    check(tokenizer.decode(ids), schema)


def test_json_object(tokenizer: Tokenizer, compiler: GrammarCompiler, demo_model: Any) -> None:
    matcher = compiler.compile(GrammarSpec("json_object"))
    prompt = tokenizer.encode("A Python dictionary in JSON:")
    ids, ended = greedy_walk(matcher, model_logits(demo_model, prompt), tokenizer.eos_token_ids,
                             tokenizer.vocab_size)
    assert ended and isinstance(json.loads(tokenizer.decode(ids)), dict)


def test_tool_call_spec(tokenizer: Tokenizer, compiler: GrammarCompiler) -> None:
    tools = [{"name": "get_weather", "parameters": SCHEMAS["tool_arguments"]},
             {"name": "get_time", "parameters": {"type": "object", "properties": {"tz": {"enum": ["UTC", "CET"]}},
                                                 "required": ["tz"], "additionalProperties": False}}]
    names = set()
    for seed in range(6):
        gen = torch.Generator().manual_seed(seed)
        matcher = compiler.compile(GrammarSpec.tool_call(tools))
        ids, ended = greedy_walk(matcher, lambda _, g=gen: torch.randn(tokenizer.vocab_size, generator=g),
                                 tokenizer.eos_token_ids, tokenizer.vocab_size)
        call = json.loads(tokenizer.decode(ids))
        assert ended and set(call) == {"name", "arguments"}
        tool = next(t for t in tools if t["name"] == call["name"])
        jsonschema.validate(call["arguments"], tool["parameters"])
        names.add(call["name"])
    assert names == {"get_weather", "get_time"}  # both reachable: the mask does not favour one


def test_mask_allows_exactly_the_grammar(tokenizer: Tokenizer, compiler: GrammarCompiler) -> None:
    matcher = compiler.compile(GrammarSpec.json_schema(SCHEMAS["enum_string"]))
    bitmask = allocate_bitmask(2, tokenizer.vocab_size)
    matcher.fill(bitmask, 1)
    assert bool((bitmask[0] == -1).all())  # an unfilled row allows everything
    allowed = unpack_bitmask(bitmask[1:], tokenizer.vocab_size)[0].nonzero().flatten().tolist()
    assert allowed and all('{"color": "'.startswith(tokenizer.decode([t])) for t in allowed)
    for t in tokenizer.encode('{"color": "', add_special_tokens=False):
        matcher.accept(t)
    matcher.fill(bitmask, 1)
    allowed = unpack_bitmask(bitmask[1:], tokenizer.vocab_size)[0].nonzero().flatten().tolist()
    pieces = {tokenizer.decode([t]) for t in allowed}
    assert all(any(c.startswith(p) for c in ("red", "green", "blue")) for p in pieces) and "r" in pieces


def test_reject_and_rollback(tokenizer: Tokenizer, compiler: GrammarCompiler) -> None:
    matcher = compiler.compile(GrammarSpec.json_schema(SCHEMAS["enum_string"]))
    bitmask = allocate_bitmask(1, tokenizer.vocab_size)
    matcher.fill(bitmask, 0)
    first = bitmask.clone()
    for t in tokenizer.encode('{"color"', add_special_tokens=False):
        matcher.accept(t)
    matcher.rollback(matcher.num_accepted)
    matcher.fill(bitmask, 0)
    assert torch.equal(bitmask, first)  # back at the start: the same mask
    with pytest.raises(RuntimeError, match="rejected"):
        matcher.accept(tokenizer.encode("x", add_special_tokens=False)[0])
    with pytest.raises(RuntimeError, match="roll back"):
        matcher.rollback(5)


@pytest.mark.parametrize("schema", [{"type": "object", "properties": {"a": {"type": "nonsense"}}},
                                    {"type": "string", "pattern": "(unclosed"}])
def test_bad_schema_is_a_clear_error(compiler: GrammarCompiler, schema: dict[str, Any]) -> None:
    with pytest.raises(StructuredOutputError, match="schema"):
        compiler.compile(GrammarSpec.json_schema(schema))


def test_fill_bitmasks_in_parallel_equals_one_by_one(tokenizer: Tokenizer, compiler: GrammarCompiler) -> None:
    names = sorted(SCHEMAS)[:8]
    matchers = [compiler.compile(GrammarSpec.json_schema(SCHEMAS[n])) for n in names]
    scratch = allocate_bitmask(1, tokenizer.vocab_size)
    for m in matchers[::2]:  # half of them one token further on: different states in one batch
        m.fill(scratch, 0)
        m.accept(int(unpack_bitmask(scratch, tokenizer.vocab_size)[0].nonzero()[0]))
    together = allocate_bitmask(len(matchers), tokenizer.vocab_size)
    compiler.fill_bitmasks([(m, i) for i, m in enumerate(matchers)], together)
    alone = allocate_bitmask(len(matchers), tokenizer.vocab_size)
    for i, m in enumerate(matchers):
        m.fill(alone, i)
    assert torch.equal(together, alone) and not bool((together == -1).all())


def test_apply_bitmask_values() -> None:
    logits = torch.arange(2 * 40, dtype=torch.float32).reshape(2, 40)
    bitmask = torch.zeros(1, 2, dtype=torch.int32)
    bitmask[0, 0] = (1 << 3) - (1 << 31)  # ids 3 and 31 (the sign bit of the int32 word)
    bitmask[0, 1] = 1 << 5  # id 37
    apply_bitmask(logits, bitmask, torch.tensor([1]))
    assert torch.equal(logits[0], torch.arange(40, dtype=torch.float32))  # an unlisted row is untouched
    kept = torch.isfinite(logits[1]).nonzero().flatten().tolist()
    assert kept == [3, 31, 37] and logits[1, 37] == 77
    full = torch.zeros(1, 40)
    apply_bitmask(full, torch.full((1, 2), -1, dtype=torch.int32))
    assert bool(torch.isfinite(full).all())
