"""README.md says what the code does (issue 10): its links resolve, and the defaults it states are the code's."""

from __future__ import annotations

import re
from pathlib import Path

from aioffload.serving.app import CHAT_DEFAULT_MAX_TOKENS, COMPLETION_DEFAULT_MAX_TOKENS

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text()


def test_relative_links_resolve() -> None:
    links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", README)
    local = [link for link in links if "://" not in link]
    assert "docs/DESIGN.md" in local
    assert [link for link in local if not (REPO / link).exists()] == []


def test_default_max_tokens_are_the_servers() -> None:
    row = next(line for line in README.splitlines() if line.startswith("| `max_tokens` |"))
    assert f"default **{COMPLETION_DEFAULT_MAX_TOKENS}**" in row.split("|")[2]  # completions column
    assert f"default **{CHAT_DEFAULT_MAX_TOKENS}**" in row.split("|")[3]  # chat column
    assert (COMPLETION_DEFAULT_MAX_TOKENS, CHAT_DEFAULT_MAX_TOKENS) == (16, 512)


def test_every_request_field_is_in_the_parameter_table() -> None:
    from aioffload.serving.protocol import ChatCompletionRequest, CompletionRequest, StreamOptions

    table = README.partition("### Request parameters supported today")[2].strip().partition("\n\n")[0]
    assert table.startswith("| parameter |")
    fields = set(CompletionRequest.__struct_fields__) | set(ChatCompletionRequest.__struct_fields__)
    fields |= {f"stream_options.{f}" for f in StreamOptions.__struct_fields__}
    missing = sorted(f for f in fields - {"stream_options"} if f"`{f}`" not in table)
    assert missing == [], f"request fields the README's table does not list: {missing}"
