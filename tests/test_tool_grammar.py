"""Tool-call grammars (serving/tool_grammar.py) in each format's own syntax: what they accept is what
the format's parser reads as calls of the request's tools, with valid arguments; what they refuse."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from fake_engine import FakeTokenizer

from aioffload.checkpoint.tokenizer import Tokenizer
from aioffload.config import DEMO_MODEL
from aioffload.serving.tool_grammar import call_grammar
from aioffload.serving.tool_parsers import PARSERS
from aioffload.worker.structured import GrammarCompiler, GrammarSpec

DEMO = Path(DEMO_MODEL)
WEATHER = {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                 "required": ["city"], "additionalProperties": False}}
TIME = {"name": "get_time", "parameters": {"type": "object", "properties": {"tz": {"enum": ["UTC", "CET"]}},
                                           "required": ["tz"], "additionalProperties": False}}
W = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
T = '{"name": "get_time", "arguments": {"tz": "UTC"}}'


class Tok:
    """A tokenizer and its compiler; `special_id` as the chat handler computes it."""

    def __init__(self, tokenizer: Any, vocab: int, eos: tuple[int, ...]) -> None:
        self.tokenizer = tokenizer
        self.compiler = GrammarCompiler(tokenizer.to_json(), vocab, eos)

    def special_id(self, text: str) -> int | None:
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        return ids[0] if len(ids) == 1 and not self.tokenizer.decode(ids) else None

    def accepts(self, grammar: str, text: str) -> bool:
        matcher = self.compiler.compile(GrammarSpec.lark_grammar(grammar))
        try:
            for t in self.tokenizer.encode(text, add_special_tokens=False):
                matcher.accept(t)
        except RuntimeError:
            return False
        return matcher.is_accepting


@pytest.fixture(scope="module")
def demo() -> Tok:
    tok = Tokenizer.from_dir(DEMO)
    return Tok(tok, tok.vocab_size, tok.eos_token_ids)


@pytest.fixture(scope="module")
def fake() -> Tok:  # [TOOL_CALLS] is one special token here, as in Mistral's tokenizers
    return Tok(FakeTokenizer(), FakeTokenizer.vocab_size, (258,))


def calls(parser: str, text: str) -> list[tuple[str, dict[str, Any]]]:
    scan = PARSERS[parser]().scan(text, final=True)
    return [(c.name, json.loads(c.arguments)) for c in scan.calls]


# (parser, mode, parallel, accepted replies, refused replies)
CASES: list[tuple[str, str, bool, list[str], list[str]]] = [
    ("hermes", "required", True,
     [f"<tool_call>\n{W}\n</tool_call>", f"<tool_call>\n{W}\n</tool_call>\n<tool_call>\n{T}\n</tool_call>"],
     ["Sure.", f"Sure. <tool_call>\n{W}\n</tool_call>", '<tool_call>\n{"name": "get_weather", "arguments": {}}',
      '<tool_call>\n{"name": "get_time", "arguments": {"tz": "PST"}}\n</tool_call>']),
    ("hermes", "required", False, [f"<tool_call>\n{T}\n</tool_call>"],
     [f"<tool_call>\n{W}\n</tool_call>\n<tool_call>\n{T}\n</tool_call>"]),
    ("hermes", "named", True, [f"<tool_call>\n{T}\n</tool_call>"], [f"<tool_call>\n{W}\n</tool_call>"]),
    ("hermes", "auto", True,
     ["Paris is sunny.", "", f"Let me check.\n<tool_call>\n{W}\n</tool_call>",
      f"<tool_call>\n{W}\n</tool_call>\n<tool_call>\n{T}\n</tool_call> done", "a <tool_ is not a call"],
     ['x <tool_call>\n{"name": "get_weather", "arguments": {"town": 1}}\n</tool_call>', "x <tool_call> nope",
      '<tool_call>\n{"name": "get_time", "arguments": {"tz": "PST"}}\n</tool_call>']),
    ("llama3_json", "required", True,
     ['{"name": "get_weather", "parameters": {"city": "Paris"}}',
      '{"name": "get_weather", "parameters": {"city": "Paris"}}; {"name": "get_time", "parameters": {"tz": "CET"}}'],
     [W, 'Here: {"name": "get_weather", "parameters": {"city": "Paris"}}']),
    ("llama3_json", "auto", True,
     ["Paris is sunny.", '{"name": "get_time", "parameters": {"tz": "UTC"}}', "  text"],
     ['{"name": "get_time", "parameters": {"tz": "PST"}}', '  {"answer": 42}']),
    ("mistral", "required", True, [f"[TOOL_CALLS][{W}, {T}]", f"[TOOL_CALLS][{T}]"],
     [f"[{W}]", f"Sure [TOOL_CALLS][{W}]"]),
    ("mistral", "auto", False, ["No call.", f"Sure. [TOOL_CALLS][{W}]", f"[TOOL_CALLS][{T}] done"],
     [f"[TOOL_CALLS][{W}, {T}]", '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": 3}}]']),
]  # fmt: skip


@pytest.mark.parametrize(("parser", "mode", "parallel", "accepted", "refused"), CASES)
def test_grammar_accepts_what_the_parser_reads_as_valid_calls(demo: Tok, fake: Tok, parser: str, mode: str,
                                                              parallel: bool, accepted: list[str],
                                                              refused: list[str]) -> None:
    tok = fake if parser == "mistral" else demo
    functions = [TIME] if mode == "named" else [{**WEATHER, "strict": True}, {**TIME, "strict": True}]
    grammar = call_grammar(PARSERS[parser].syntax, functions, mode, parallel, tok.special_id)
    schemas = {f["name"]: f["parameters"] for f in (WEATHER, TIME)}
    for text in accepted:
        assert tok.accepts(grammar, text), (text, grammar)
        parsed = calls(parser, text)
        assert len(parsed) == text.count('"name": "'), (text, parsed)  # every call in it reads as one
        for name, arguments in parsed:
            jsonschema.validate(arguments, schemas[name])
    for text in refused:
        assert not tok.accepts(grammar, text), (text, grammar)


def test_a_special_trigger_is_written_as_its_token(fake: Tok) -> None:
    grammar = call_grammar(PARSERS["mistral"].syntax, [WEATHER], "required", True, fake.special_id)
    assert "<[257]>" in grammar and "[TOOL_CALLS]" not in grammar
    typed = "[TOOL_CALLS]"  # the same characters as text, not the special token: refused
    matcher = fake.compiler.compile(GrammarSpec.lark_grammar(grammar))
    with pytest.raises(RuntimeError):
        for ch in typed.encode():
            matcher.accept(ch)


def test_auto_leaves_non_strict_arguments_free(demo: Tok) -> None:
    grammar = call_grammar(PARSERS["hermes"].syntax, [{**WEATHER, "strict": True}, TIME], "auto", True,
                           demo.special_id)  # fmt: skip
    free = '<tool_call>\n{"name": "get_time", "arguments": {"tz": "PST", "x": [1]}}\n</tool_call>'
    assert demo.accepts(grammar, free)
    assert not demo.accepts(grammar, '<tool_call>\n{"name": "get_weather", "arguments": {"x": 1}}\n</tool_call>')
