"""Tool-call formats of the model families we serve, one module each, and how one is chosen.

The parser follows the chat template (the template is what taught the model its format);
`--tool-call-parser` overrides the choice.
"""

from __future__ import annotations

from aioffload.serving.tool_parsers.base import CallSyntax, ParsedCall, Scan, ToolParser
from aioffload.serving.tool_parsers.hermes import HermesParser
from aioffload.serving.tool_parsers.llama3_json import Llama3JsonParser
from aioffload.serving.tool_parsers.mistral import MistralParser

PARSERS: dict[str, type[ToolParser]] = {
    "hermes": HermesParser,
    "llama3_json": Llama3JsonParser,
    "mistral": MistralParser,
}

__all__ = ["PARSERS", "CallSyntax", "ParsedCall", "Scan", "ToolParser", "parser_for_template"]


def parser_for_template(template: str) -> str | None:
    """The parser name a chat template's own tool-call syntax points to; None if it shows none."""
    if "<tool_call>" in template:
        return "hermes"
    if "[TOOL_CALLS]" in template:
        return "mistral"
    if "<|start_header_id|>" in template and ("<|python_tag|>" in template or '"parameters"' in template):
        return "llama3_json"
    return None
