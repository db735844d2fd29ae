"""What every tool-call format shares: a parsed call, a scan of the text so far, JSON helpers.

A format's `scan(text, final)` reads the whole output so far and says how far it is plain
content, which tool calls are complete, and where the unparsed rest begins. The streaming
driver (`serving.tool_calls.ToolCallStream`) diffs successive scans, so a streamed response
and a JSON one are the same events by construction.
"""

from __future__ import annotations

import json
import secrets
import string
from dataclasses import dataclass, field
from typing import Any, Protocol

_DECODER = json.JSONDecoder()


@dataclass(frozen=True)
class ParsedCall:
    name: str
    arguments: str  # JSON text of the arguments object, as OpenAI returns it


@dataclass(frozen=True)
class Scan:
    content_end: int  # text[:content_end] is content: no call starts before it
    calls: list[ParsedCall] = field(default_factory=list)  # complete calls after content_end
    rest: int | None = None  # text[rest:] is not (yet) a complete call; None: no call region began


@dataclass(frozen=True)
class CallSyntax:
    """How a format writes its calls, for writing them under a grammar (serving/tool_grammar.py):
    `trigger head CALL (separator CALL)* tail`, each CALL `{"name": ..., arguments_key: {...}}`.
    An empty trigger: calls can only open the reply."""

    trigger: str
    head: str
    separator: str
    tail: str
    arguments_key: str = "arguments"


class ToolParser(Protocol):
    name: str
    syntax: CallSyntax

    def scan(self, text: str, final: bool) -> Scan: ...

    def new_call_id(self) -> str: ...


def openai_call_id() -> str:
    return f"call_{secrets.token_hex(12)}"


def mistral_call_id() -> str:
    """Mistral's templates require ids of exactly 9 letters and digits."""
    alphabet = string.ascii_letters + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(9))


def held_suffix(text: str, marker: str) -> int:
    """Length of the longest proper prefix of `marker` that `text` ends with (it may yet become the marker)."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:k]):
            return k
    return 0


def content_only(text: str, final: bool, marker: str) -> Scan:
    """No call region yet: everything is content except a tail that may start `marker`."""
    return Scan(len(text) if final else len(text) - held_suffix(text, marker))


def skip_space(text: str, pos: int) -> int:
    while pos < len(text) and text[pos].isspace():
        pos += 1
    return pos


def decode_object(text: str, pos: int) -> tuple[dict[str, Any], int] | None:
    """The JSON object starting at text[pos] and the index after it; None if incomplete or not an object."""
    try:
        value, end = _DECODER.raw_decode(text, pos)
    except json.JSONDecodeError:
        return None
    return (value, end) if isinstance(value, dict) else None


def as_call(obj: dict[str, Any], argument_keys: tuple[str, ...] = ("arguments", "parameters")) -> ParsedCall | None:
    """{"name": str, "arguments" | "parameters": object or JSON text} -> ParsedCall; None if not a call."""
    name = obj.get("name")
    if not isinstance(name, str) or not name:
        return None
    key = next((k for k in argument_keys if k in obj), None)
    args: Any = {} if key is None else obj[key]
    if isinstance(args, str):  # some models write the arguments as JSON text
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None
    if not isinstance(args, dict):
        return None
    return ParsedCall(name, json.dumps(args, ensure_ascii=False))
