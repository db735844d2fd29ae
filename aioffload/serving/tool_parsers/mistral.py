"""Mistral format: `[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]` (v3 tokenizers), or
`[TOOL_CALLS]name[ARGS]{...}` once per call (v11+ tokenizers). Ids are 9 letters and digits,
as Mistral's chat templates require when the calls are sent back."""

from __future__ import annotations

from aioffload.serving.tool_parsers.base import (
    CallSyntax,
    ParsedCall,
    Scan,
    as_call,
    content_only,
    decode_object,
    mistral_call_id,
    skip_space,
)

MARKER, ARGS = "[TOOL_CALLS]", "[ARGS]"


def _array_calls(text: str, pos: int, calls: list[ParsedCall]) -> int | None:
    """Parse `[{...}, {...}]` at pos, appending complete calls; the index after `]`, or None if unfinished."""
    pos = skip_space(text, pos + 1)  # past "["
    while (found := decode_object(text, pos)) is not None and (call := as_call(found[0])) is not None:
        calls.append(call)
        pos = skip_space(text, found[1])
        if text.startswith("]", pos):
            return pos + 1
        if not text.startswith(",", pos):
            return None
        pos = skip_space(text, pos + 1)
    return None


class MistralParser:
    name = "mistral"
    syntax = CallSyntax(MARKER, "[", ", ", "]")  # the v3 array form

    def scan(self, text: str, final: bool) -> Scan:
        start = text.find(MARKER)
        if start < 0:
            return content_only(text, final, MARKER)
        calls: list[ParsedCall] = []
        rest = start
        while text.startswith(MARKER, pos := skip_space(text, rest)):
            body = skip_space(text, pos + len(MARKER))
            if text.startswith("[", body):
                end = _array_calls(text, body, calls)
                if end is None:
                    break
            else:
                args_at = text.find(ARGS, body)
                name = text[body:args_at].strip() if args_at >= 0 else ""
                found = decode_object(text, args_at + len(ARGS)) if name else None
                call = as_call({"name": name, "arguments": found[0]}) if found else None
                if call is None:
                    break
                calls.append(call)
                end = found[1]  # type: ignore[index]  # found is set when call is
            rest = end
        return Scan(start, calls, rest)

    def new_call_id(self) -> str:
        return mistral_call_id()
