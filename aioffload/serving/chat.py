"""A chat request as the chat template sees it: messages (with earlier tool calls), tools, and the
tool-call plan for the reply (which parser reads it, whether calls may be parallel; the grammar of
`tool_choice: required`, a named function or `strict` functions is serving/tool_grammar.py's)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

import anyio
import msgspec

from aioffload.checkpoint.tokenizer import Tokenizer
from aioffload.serving.protocol import ApiError, ChatCompletionRequest, ChatMessage, Tool
from aioffload.serving.tool_parsers import PARSERS, ToolParser, parser_for_template

_TOOL_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule for function names


def template_messages(messages: list[ChatMessage], param: str = "messages") -> list[dict[str, Any]]:
    """Messages as Hugging Face chat templates expect them: text content, tool-call arguments as objects."""
    if not messages:
        raise ApiError(400, f"{param} must be a non-empty list", param)
    out = []
    for i, m in enumerate(messages):
        content = m.content
        if isinstance(content, list):
            if any(p.type != "text" or p.text is None for p in content):
                raise ApiError(400, "only content parts of type 'text' are supported", f"{param}[{i}].content")
            content = "\n".join(p.text or "" for p in content)
        if content is None and not m.tool_calls:
            raise ApiError(400, "content must be a string unless the message has tool_calls", f"{param}[{i}].content")
        item: dict[str, Any] = {"role": m.role, "content": content or ""}
        if m.name is not None:
            item["name"] = m.name
        if m.tool_calls:
            if m.role != "assistant":
                raise ApiError(400, "only assistant messages carry tool_calls", f"{param}[{i}].tool_calls")
            calls = enumerate(m.tool_calls)
            item["tool_calls"] = [_template_call(c, f"{param}[{i}].tool_calls[{j}]") for j, c in calls]
        if m.role == "tool":
            if m.tool_call_id is None:
                raise ApiError(400, "a tool message needs the tool_call_id it answers", f"{param}[{i}].tool_call_id")
            item["tool_call_id"] = m.tool_call_id
        elif m.tool_call_id is not None:
            raise ApiError(400, "only tool messages carry a tool_call_id", f"{param}[{i}].tool_call_id")
        out.append(item)
    return out


def _template_call(call: Any, param: str) -> dict[str, Any]:
    try:
        arguments = json.loads(call.function.arguments)
    except json.JSONDecodeError:
        raise ApiError(400, "arguments must be JSON text", f"{param}.function.arguments") from None
    if not isinstance(arguments, dict):
        raise ApiError(400, "arguments must be a JSON object", f"{param}.function.arguments")
    # Templates (Llama 3.1, Qwen, Mistral) render the arguments object themselves, with tojson.
    entry: dict[str, Any] = {} if call.id is None else {"id": call.id}
    return {**entry, "type": "function", "function": {"name": call.function.name, "arguments": arguments}}


def check_tools(tools: list[Tool]) -> list[dict[str, Any]]:
    """The tools as the template renders them (OpenAI's JSON shape, unset fields left out)."""
    names = set()
    for i, tool in enumerate(tools):
        name, param = tool.function.name, f"tools[{i}].function"
        if not _TOOL_NAME.match(name):
            raise ApiError(400, "function names are 1-64 letters, digits, '_' or '-'", f"{param}.name")
        if name in names:
            raise ApiError(400, f"two tools are named {name!r}", f"{param}.name")
        names.add(name)
        params = tool.function.parameters
        if params is not None and params.get("type", "object") != "object":
            raise ApiError(400, "parameters must be a JSON schema of type 'object'", f"{param}.parameters")
    return [_without_nones(msgspec.to_builtins(t)) for t in tools]


def _without_nones(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_nones(v) for k, v in value.items() if v is not None}
    return value


@dataclass(frozen=True)
class ToolPlan:
    """What the template renders and who reads the reply; no tools: `tools` and `parser` are None."""

    tools: list[dict[str, Any]] | None = None
    parser: ToolParser | None = None
    parallel: bool = True


def tool_plan(req: ChatCompletionRequest, template: str, template_uses_tools: bool,
              parser_override: str | None) -> ToolPlan:
    """Check `tools`, `tool_choice` and `parallel_tool_calls` and decide the plan."""
    choice = req.tool_choice
    if not req.tools:
        if choice not in (None, "none"):
            raise ApiError(400, "tool_choice needs tools", "tool_choice")
        return ToolPlan()
    tools = check_tools(req.tools)
    if choice == "none":
        return ToolPlan()  # the model may not call tools: they are not shown to it, nor looked for
    if not template_uses_tools:
        raise ApiError(400, "this model's chat template does not render tools", "tools")
    name = parser_override or parser_for_template(template)
    if name is None:
        raise ApiError(400, "no tool-call format is known for this model's chat template; start the server "
                       f"with --tool-call-parser ({', '.join(PARSERS)})", "tools")  # fmt: skip
    return ToolPlan(tools, PARSERS[name](), req.parallel_tool_calls is not False)


async def render_chat(tokenizer: Tokenizer, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None,
                      add_generation_prompt: bool = True, add_special_tokens: bool = False) -> list[int]:  # fmt: skip
    """The chat template rendered and encoded off the event loop; a template's error (its
    raise_exception, e.g. roles must alternate) is the user's: a 400 on `messages`. The template
    writes BOS itself, hence no special tokens unless asked."""

    def render() -> list[int]:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt, tools)
        return tokenizer.encode(text, add_special_tokens=add_special_tokens)

    try:
        return await anyio.to_thread.run_sync(render)
    except Exception as e:
        raise ApiError(400, f"cannot apply the chat template: {e}", "messages") from None
