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


API_SECTION = README.partition("## The OpenAI API: what is supported")[2].partition("\n## ")[0]


def test_default_max_tokens_are_the_servers() -> None:
    assert (
        f"`max_tokens` defaults to **{COMPLETION_DEFAULT_MAX_TOKENS}** for completions and "
        f"**{CHAT_DEFAULT_MAX_TOKENS}** for chat" in " ".join(API_SECTION.split())
    )
    assert (COMPLETION_DEFAULT_MAX_TOKENS, CHAT_DEFAULT_MAX_TOKENS) == (16, 512)


def test_every_request_field_is_in_the_parameter_tables() -> None:
    from aioffload.serving.protocol import ChatCompletionRequest, CompletionRequest, StreamOptions

    assert API_SECTION.count("|---|---|") >= 2  # the completions table and the chat table
    fields = set(CompletionRequest.__struct_fields__) | set(ChatCompletionRequest.__struct_fields__)
    fields |= {f"stream_options.{f}" for f in StreamOptions.__struct_fields__}
    missing = sorted(f for f in fields - {"stream_options"} if f"`{f}`" not in API_SECTION)
    assert missing == [], f"request fields the README's tables do not list: {missing}"
