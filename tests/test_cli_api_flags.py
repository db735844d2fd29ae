"""The serve flags of the API surface: --allowed-origins and --tool-call-parser reach ServerConfig."""

from __future__ import annotations

import pytest

from aioffload.cli import build_parser
from aioffload.serving.tool_parsers import PARSERS


def parse(*args: str) -> object:
    return build_parser().parse_args(["serve", *args])


def test_defaults_are_off() -> None:
    args = parse()
    assert args.allowed_origins == [] and args.tool_call_parser is None  # type: ignore[attr-defined]


def test_allowed_origins_comma_separated_and_repeated() -> None:
    args = parse("--allowed-origins", "https://a.example,http://localhost:3000", "--allowed-origins", "*")
    assert args.allowed_origins == ["https://a.example", "http://localhost:3000", "*"]  # type: ignore[attr-defined]


@pytest.mark.parametrize("bad", ["a.example", "https://a.example/", "ftp://a.example"])
def test_allowed_origins_must_be_origins(bad: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        parse("--allowed-origins", bad)
    assert e.value.code == 2 and "is not an origin" in capsys.readouterr().err


def test_tool_call_parser_choices(capsys: pytest.CaptureFixture[str]) -> None:
    assert parse("--tool-call-parser", "mistral").tool_call_parser == "mistral"  # type: ignore[attr-defined]
    with pytest.raises(SystemExit):
        parse("--tool-call-parser", "nope")
    err = capsys.readouterr().err
    assert "invalid choice" in err and all(name in err for name in PARSERS)
