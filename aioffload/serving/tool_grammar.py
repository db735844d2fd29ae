"""Tool calls under a grammar: `tool_choice: required`, a named function, and `strict` functions.

The calls are written in the served format's own syntax (`CallSyntax` of its parser: Hermes'
`<tool_call>` blocks, Mistral's `[TOOL_CALLS][...]`, Llama 3's bare JSON), so the model writes
what its template taught it and the same parser reads the reply; each call object is a `%json`
lexeme of `GrammarSpec.call_schema`, so its name is one of the tools and its arguments validate
against that tool's `parameters`.

- required: the reply is calls only (one with `parallel_tool_calls: false`), of any tool.
- a named function: the reply is one call of that function.
- auto with `strict: true` functions: free text, in which every call region the format opens
  (its trigger) must hold well-formed calls; strict functions' arguments follow their schemas,
  the others' are any JSON object. Text never holds the trigger outside a call region.

A trigger that the tokenizer holds as one special token (Mistral's `[TOOL_CALLS]`) is written as
that token (`<[id]>`): special tokens never appear in free text, so nothing else is needed.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

from aioffload.serving.protocol import ApiError, ChatCompletionRequest
from aioffload.serving.tool_parsers import CallSyntax
from aioffload.worker.structured import GrammarSpec

SpecialId = Callable[[str], "int | None"]  # the id of a text that is one special token, else None
_REGEX_META = set("\\.+*?()|[]{}^$#&-~/")


def _regex_literal(text: str) -> str:
    return "".join(f"\\{ch}" if ch in _REGEX_META else ch for ch in text)


def _literal(text: str, trigger: str, trigger_id: int | None) -> str:
    """Lark terms writing `text`; occurrences of a special-token trigger become that token."""
    if not text:
        return ""
    if trigger_id is None or not trigger:
        return json.dumps(text)
    parts = text.split(trigger)
    terms = [json.dumps(p) if p else "" for p in parts]
    return f" <[{trigger_id}]> ".join(terms).strip()


def _calls(syntax: CallSyntax, call: str, parallel: bool, trigger_id: int | None, with_trigger: bool) -> str:
    """`[trigger] head call (separator call)* tail` as Lark terms."""
    lit = lambda s: _literal(s, syntax.trigger, trigger_id)
    more = f" ({lit(syntax.separator)} {call})*" if parallel else ""
    head = lit(syntax.trigger) + " " if with_trigger else ""
    return f"{head}{lit(syntax.head)} {call}{more} {lit(syntax.tail)}".strip()


def call_grammar(syntax: CallSyntax, functions: Sequence[dict[str, Any]], mode: str, parallel: bool,
                 special_id: SpecialId) -> str:
    """The Lark grammar of a reply. functions: OpenAI function objects ({"name", "parameters", "strict"});
    mode: "required" (calls only), "named" (one call of functions[0]) or "auto" (text, strict calls)."""
    key = syntax.arguments_key
    if mode == "auto":
        functions = [f if f.get("strict") else {**f, "parameters": {"type": "object"}} for f in functions]
    lines = ["%llguidance {}", f"call: {GrammarSpec.json_lexeme(GrammarSpec.call_schema(functions, key))}"]
    trigger_id = special_id(syntax.trigger) if syntax.trigger else None
    if mode in ("required", "named"):
        lines.append(f"start: {_calls(syntax, 'call', parallel and mode == 'required', trigger_id, True)}")
    elif not syntax.trigger:  # calls open the reply, or the reply is text that does not start like a call
        lines.append(f"start: {_calls(syntax, 'call', parallel, trigger_id, True)} | PLAIN")
        lines.append("PLAIN: /[ \\t\\n]*([^{ \\t\\n](.|\\n)*)?/")
    elif trigger_id is not None:  # a special token never appears in text: it alone opens a region
        lines.append(f"start: TEXT (region TEXT){'*' if parallel else '?'}")
        lines.append(f"region: {_calls(syntax, 'call', parallel, trigger_id, True)}")
        lines.append("TEXT: /(.|\\n)*/")
    else:  # text up to the first trigger (a lazy lexeme), a region; text never holds the trigger otherwise
        lines.append(f"start: {'region* TEXT' if parallel else 'TEXT | region TEXT'}")
        lines.append(f"opening[lazy]: TEXT {json.dumps(syntax.trigger)}")
        lines.append(f"region: opening {_calls(syntax, 'call', parallel, trigger_id, False)}")
        lines.append(f"TEXT: /(.|\\n)*/ & ~/(.|\\n)*{_regex_literal(syntax.trigger)}(.|\\n)*/")
    return "\n".join(lines) + "\n"


def tool_mode(req: ChatCompletionRequest,
              functions: Sequence[dict[str, Any]]) -> tuple[str, list[dict[str, Any]]] | None:
    """(mode, the functions it covers) when the reply is constrained, else None."""
    choice = req.tool_choice
    if choice == "required":
        return "required", list(functions)
    if choice is not None and not isinstance(choice, str):  # a named function
        named = [f for f in functions if f["name"] == choice.function.name]
        if not named:
            raise ApiError(400, f"tool_choice names {choice.function.name!r}, which is not among the tools",
                           "tool_choice.function.name")  # fmt: skip
        return "named", named
    if choice in (None, "auto") and any(f.get("strict") for f in functions):
        return "auto", list(functions)
    return None


def tool_call_spec(req: ChatCompletionRequest, syntax: CallSyntax, tools: Sequence[dict[str, Any]],
                   parallel: bool, special_id: SpecialId) -> GrammarSpec | None:
    """The grammar a chat request's reply follows because of its tools, or None (tools: the checked
    `{"type": "function", "function": {...}}` list the template renders)."""
    functions = [t["function"] for t in tools]
    mode = tool_mode(req, functions)
    if mode is None:
        return None
    return GrammarSpec.lark_grammar(call_grammar(syntax, mode[1], mode[0], parallel, special_id))
