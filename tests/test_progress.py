"""The load progress bar: fraction, bar, totals and rate, redrawn on a terminal; one line at the
start and one at the end anywhere else (a log file)."""

from __future__ import annotations

import io

import pytest

import aioffload.progress as progress_mod
from aioffload.progress import Progress


class Terminal(io.StringIO):
    """A stream that says it is a terminal."""

    def isatty(self) -> bool:
        return True


class Clock:
    """Stands in for the `time` module inside aioffload.progress."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def perf_counter(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch):
    c = Clock()
    monkeypatch.setattr(progress_mod, "time", c)
    return c


def frames(stream: Terminal) -> list[str]:
    """Each redraw starts with a carriage return."""
    return stream.getvalue().split("\r")[1:]


def test_render_fraction_bar_totals_and_rate(clock):
    p = Progress("loading weights", 16e9, unit_scale=1e9, unit="GB", stream=io.StringIO())
    clock.now += 2.0
    p.done = 4e9
    assert p.render() == f"loading weights [{'#' * 7}{'.' * 23}] 4.00/16.00 GB 2.00 GB/s"
    p.done = 8e9
    assert p.render(clock.now + 2.0) == f"loading weights [{'#' * 15}{'.' * 15}] 8.00/16.00 GB 2.00 GB/s"
    p.done = 16e9
    assert p.render() == f"loading weights [{'#' * 30}] 16.00/16.00 GB 8.00 GB/s"


def test_bar_never_overflows(clock):
    p = Progress("x", 1000, stream=io.StringIO(), min_total=0)
    p.done = 2500  # more than announced (e.g. a rough total)
    clock.now += 1.0
    assert p.render() == f"x [{'#' * 30}] 2500.00/1000.00  2500.00 /s"


def test_zero_total_renders_full(clock):
    p = Progress("x", 0, stream=io.StringIO(), min_total=0)
    assert p.render().startswith(f"x [{'#' * 30}] 0.00/0.00")


def test_advance_draws_to_terminal_at_most_every_200ms(clock):
    out = Terminal()
    p = Progress("loading", 1e9, unit_scale=1e6, unit="MB", min_total=1e6, stream=out)
    assert p.enabled and out.getvalue() == ""
    clock.now += 1.0
    p.advance(250e6)  # first draw
    clock.now += 0.1
    p.advance(250e6)  # too soon: no redraw
    assert p.done == 500e6
    assert frames(out) == [f"loading [{'#' * 7}{'.' * 23}] 250.00/1000.00 MB 250.00 MB/s"]
    clock.now += 0.1
    p.advance(250e6)  # 0.2 s after the last draw
    assert len(frames(out)) == 2
    assert frames(out)[1] == f"loading [{'#' * 22}{'.' * 8}] 750.00/1000.00 MB 625.00 MB/s"
    p.advance(250e6)
    p.close()  # always draws the final state, then ends the line
    last = frames(out)[-1]
    assert last == f"loading [{'#' * 30}] 1000.00/1000.00 MB 833.33 MB/s\n"
    assert out.getvalue().count("\n") == 1


@pytest.mark.parametrize("stream", [Terminal, io.StringIO])
def test_silent_under_min_total(clock, stream):
    out = stream()
    p = Progress("loading", 199e6, stream=out)  # default min_total: 200e6
    assert not p.enabled
    for _ in range(10):
        clock.now += 1.0
        p.advance(19.9e6)
    p.close()
    assert out.getvalue() == ""
    assert p.done == pytest.approx(199e6)  # still counts, only draws nothing
    assert Progress("loading", 200e6, stream=io.StringIO()).enabled


def test_log_file_gets_one_line_at_start_and_one_at_end(clock, tmp_path):
    with open(tmp_path / "server.log", "w+") as log:  # a real file: isatty() is False
        p = Progress("loading weights", 16e9, unit_scale=1e9, unit="GB", stream=log)
        assert not p.terminal
        for _ in range(40):
            clock.now += 0.25  # every advance would redraw on a terminal
            p.advance(0.4e9)
        p.close()
        log.seek(0)
        text = log.read()
    assert "\r" not in text
    assert text.splitlines() == ["loading weights: 16.00 GB ...", "loading weights: 16.00 GB in 10.0 s (1.60 GB/s)"]


def test_defaults_to_stderr_and_pytest_capture_is_not_a_terminal(capsys, clock):
    p = Progress("load", 10, min_total=1)
    clock.now += 2.0
    p.advance(5)
    p.close()
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == "load: 10.00 ...\nload: 5.00 in 2.0 s (2.50 /s)\n"


def test_terminal_frames_end_with_one_newline(clock):
    out = Terminal()
    p = Progress("load", 10, min_total=1, stream=out)
    clock.now += 1.0
    p.advance(5)
    p.close()
    frame = f"load [{'#' * 15}{'.' * 15}] 5.00/10.00  5.00 /s"
    assert out.getvalue() == f"\r{frame}\r{frame}\n"


def test_stream_without_isatty_counts_as_a_log() -> None:
    class Bare:
        def __init__(self) -> None:
            self.text = ""

        def write(self, s: str) -> None:
            self.text += s

        def flush(self) -> None:
            pass

    out = Bare()
    p = Progress("x", 1, min_total=0, stream=out)  # type: ignore[arg-type]
    p.advance(1)
    p.close()
    assert "\r" not in out.text and out.text.count("\n") == 2
