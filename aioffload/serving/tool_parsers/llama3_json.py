"""Llama 3.1+ JSON format: the whole reply is `{"name": ..., "parameters": {...}}` (several joined by `;`),
optionally after `<|python_tag|>`. A reply that does not start so is plain content."""

from __future__ import annotations

from aioffload.serving.tool_parsers.base import (
    CallSyntax,
    Scan,
    as_call,
    decode_object,
    openai_call_id,
    skip_space,
)

PYTHON_TAG = "<|python_tag|>"


class Llama3JsonParser:
    name = "llama3_json"
    syntax = CallSyntax("", "", "; ", "", arguments_key="parameters")

    def scan(self, text: str, final: bool) -> Scan:
        pos = skip_space(text, 0)
        head = text[pos:]
        if not head or (PYTHON_TAG.startswith(head) and head != PYTHON_TAG):
            return Scan(len(text) if final else 0)  # cannot tell yet
        if head.startswith(PYTHON_TAG):
            pos = skip_space(text, pos + len(PYTHON_TAG))
        elif not head.startswith("{"):
            return Scan(len(text))  # a plain reply: calls only ever open the reply
        calls, rest = [], pos
        while (found := decode_object(text, pos)) is not None:
            call = as_call(found[0], ("parameters", "arguments"))
            if call is None:
                break
            calls.append(call)
            rest = found[1]
            pos = skip_space(text, rest)
            if not text.startswith(";", pos):
                break
            pos = skip_space(text, pos + 1)
        return Scan(0, calls, rest)

    def new_call_id(self) -> str:
        return openai_call_id()
