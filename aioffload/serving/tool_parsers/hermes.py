"""Hermes / Qwen 2.5+ format: `<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>`, one block per call."""

from __future__ import annotations

import json

from aioffload.serving.tool_parsers.base import CallSyntax, Scan, as_call, content_only, openai_call_id, skip_space

START, END = "<tool_call>", "</tool_call>"


class HermesParser:
    name = "hermes"
    syntax = CallSyntax(START, "\n", f"\n{END}\n{START}\n", f"\n{END}")

    def scan(self, text: str, final: bool) -> Scan:
        start = text.find(START)
        if start < 0:
            return content_only(text, final, START)
        calls, pos = [], start
        while text.startswith(START, skip_space(text, pos)):
            body_at = skip_space(text, pos) + len(START)
            end = text.find(END, body_at)
            body = text[body_at:] if end < 0 else text[body_at:end]
            if end < 0 and not final:
                break  # still being written
            try:
                obj = json.loads(body)
            except json.JSONDecodeError:
                break
            call = as_call(obj) if isinstance(obj, dict) else None
            if call is None:
                break
            calls.append(call)
            pos = len(text) if end < 0 else end + len(END)  # an unclosed last block is accepted at the end
        return Scan(start, calls, pos)

    def new_call_id(self) -> str:
        return openai_call_id()
