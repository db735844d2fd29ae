"""Constrained decoding: a per-request grammar matcher gives each step a vocabulary bitmask.

Built on llguidance (docs/structured-output.md says why). One `GrammarCompiler` per served
tokenizer (building its token trie costs ~1 s for a 128k vocabulary); `compile(spec)` gives a
`Matcher` per request (about 1 ms for the schemas we test). Each step:

    masks = allocate_bitmask(num_rows, vocab_size)      # host, int32, -1 = every id allowed
    fill_bitmasks([(matcher, row), ...], masks)         # host CPU, in parallel, GIL released
    apply_bitmask(logits, masks.to(device), rows)       # device: disallowed ids -> -inf
    ... sample ...; matcher.accept(token)               # advance on the sampled token

Bit j of word i of a row is token id 32 * i + j. When the grammar is complete only the eos ids
stay allowed, so a constrained request ends with eos and its text parses. Nothing here runs for
requests without a matcher.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from aioffload.checkpoint.tokenizer import Tokenizer
from aioffload.worker.masks import bitmask_words

# Compact, predictable JSON: json.dumps's separators and no free whitespace. Free whitespace lets a
# model (or an unlucky sample) pad forever between tokens; these separators are what models write.
_JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class StructuredOutputError(ValueError):
    """A schema the grammar compiler refuses; the message says why (the HTTP layer makes it a 400)."""


@dataclass(frozen=True)
class GrammarSpec:
    """What a request constrains its output to: any JSON object, JSON valid against `schema`, or a
    Lark grammar (llguidance's dialect, whose `%json {...}` lexemes are JSON schemas)."""

    kind: Literal["json_object", "json_schema", "lark"]
    schema: str | None = None  # JSON text of the schema (kind json_schema): hashable, as SamplingParams is
    lark: str | None = None  # the grammar text (kind lark)

    @classmethod
    def json_schema(cls, schema: dict[str, Any]) -> GrammarSpec:
        return cls("json_schema", json.dumps(schema))  # key order kept: properties are written in it

    @classmethod
    def lark_grammar(cls, grammar: str) -> GrammarSpec:
        return cls("lark", lark=grammar)

    @staticmethod
    def json_lexeme(schema: dict[str, Any]) -> str:
        """`%json {...}` for a Lark grammar: a JSON value valid against `schema`, written with the same
        separators and whitespace as every other constrained output."""
        return "%json " + json.dumps({"x-guidance": _JSON_OPTIONS, **schema})

    @staticmethod
    def call_schema(tools: Sequence[dict[str, Any]], arguments_key: str = "arguments") -> dict[str, Any]:
        """The schema of one call `{"name": ..., <arguments_key>: {...}}` of one of `tools` (OpenAI's
        function objects: {"name", "parameters"}), its arguments valid against that tool's parameters."""
        calls = [{"type": "object", "additionalProperties": False, "required": ["name", arguments_key],
                  "properties": {"name": {"const": t["name"]},
                                 arguments_key: t.get("parameters") or {"type": "object"}}} for t in tools]
        return calls[0] if len(calls) == 1 else {"anyOf": calls}

    @classmethod
    def tool_call(cls, tools: Sequence[dict[str, Any]]) -> GrammarSpec:
        """One bare call `{"name": ..., "arguments": {...}}` of one of `tools` (see `call_schema`)."""
        return cls.json_schema(cls.call_schema(tools))

    def grammar(self) -> str:
        """The llguidance grammar text of this spec."""
        import llguidance

        if self.kind == "lark":
            return llguidance.LLMatcher.grammar_from_lark(self.lark or "")
        schema = {"type": "object"} if self.kind == "json_object" else json.loads(self.schema or "{}")
        return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=_JSON_OPTIONS)


class Matcher:
    """One request's grammar state; not thread-safe (one step at a time, as the engine runs them)."""

    def __init__(self, matcher: Any, vocab_size: int) -> None:
        self._m = matcher
        self.vocab_size = vocab_size
        self.num_accepted = 0

    def copy(self) -> Matcher:
        """A new matcher in this one's state (cheaper than compiling the grammar again)."""
        twin = Matcher(self._m.deep_copy(), self.vocab_size)
        twin.num_accepted = self.num_accepted
        return twin

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the next-token mask into bitmask[row] (host int32 [B, words], contiguous)."""
        _check_bitmask(bitmask, self.vocab_size)
        target = bitmask[row]
        self._m.unsafe_compute_mask_ptr(target.data_ptr(), target.numel() * target.element_size())

    def accept(self, token_id: int) -> None:
        """Advance on the sampled token; a token the last mask did not allow is a bug upstream."""
        if not self._m.consume_token(token_id):
            raise RuntimeError(f"token {token_id} rejected by the grammar: {self._m.get_error()}")
        self.num_accepted += 1

    def rollback(self, num_tokens: int) -> None:
        """Undo the last `num_tokens` accepted tokens (rejected speculative tokens)."""
        if not 0 <= num_tokens <= self.num_accepted or not self._m.rollback(num_tokens):
            raise RuntimeError(f"cannot roll back {num_tokens} of {self.num_accepted} tokens")
        self.num_accepted -= num_tokens

    @property
    def is_finished(self) -> bool:
        """The output is complete: only eos is allowed from here."""
        return bool(self._m.is_stopped())

    @property
    def is_accepting(self) -> bool:
        """The output so far is a complete value (it may still go on, e.g. more digits)."""
        return bool(self._m.is_accepting())


class GrammarCompiler:
    """Compiles GrammarSpecs into Matchers for one tokenizer."""

    def __init__(self, tokenizer_json: str, vocab_size: int, eos_token_ids: Sequence[int]) -> None:
        import llguidance

        if not eos_token_ids:
            raise StructuredOutputError("constrained decoding needs an eos token id to end a finished output")
        self._ll = llguidance
        self.vocab_size = vocab_size
        self._tokenizer = llguidance.LLTokenizer(tokenizer_json, n_vocab=vocab_size, eos_token=list(eos_token_ids))
        self._executor = llguidance.LLExecutor()

    @classmethod
    def for_tokenizer(cls, tokenizer: Tokenizer, vocab_size: int, eos_token_ids: Sequence[int]) -> GrammarCompiler:
        """`vocab_size` is the model's (the logits' width), which may exceed the tokenizer's."""
        return cls(tokenizer.to_json(), vocab_size, eos_token_ids)

    def compile(self, spec: GrammarSpec) -> Matcher:
        try:
            grammar = spec.grammar()
        except ValueError as e:
            raise StructuredOutputError(f"not a usable JSON schema: {e}") from None
        matcher = self._ll.LLMatcher(self._tokenizer, grammar, log_level=0)
        if matcher.is_error():
            what = "grammar" if spec.kind == "lark" else "JSON schema"
            raise StructuredOutputError(f"the {what} cannot be compiled: {matcher.get_error()}")
        return Matcher(matcher, self.vocab_size)

    def fill_bitmasks(self, rows: Sequence[tuple[Matcher, int]], bitmask: torch.Tensor) -> None:
        """Fill bitmask[row] for every (matcher, row), on llguidance's thread pool (GIL released)."""
        if not rows:
            return
        _check_bitmask(bitmask, self.vocab_size)
        words = bitmask.shape[1]
        self._executor.unsafe_compute_mask_ptr([(m._m, row) for m, row in rows], bitmask.data_ptr(), words * 4,
                                               bitmask.shape[0])  # fmt: skip


def _check_bitmask(bitmask: torch.Tensor, vocab_size: int) -> None:
    if bitmask.dtype != torch.int32 or bitmask.device.type != "cpu" or not bitmask.is_contiguous():
        raise ValueError("bitmask must be a contiguous int32 host tensor")
    if bitmask.dim() != 2 or bitmask.shape[1] != bitmask_words(vocab_size):
        raise ValueError(f"bitmask must be [rows, {bitmask_words(vocab_size)}], got {list(bitmask.shape)}")
