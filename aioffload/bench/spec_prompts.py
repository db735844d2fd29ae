"""The prompt set of `aioffload bench speculative`: summaries and edits of a given text, where an
answer repeats spans of its prompt (the case prompt lookup is for). The prose is the demo model's
held-out text (Python documentation); the code is written here."""

from __future__ import annotations

from pathlib import Path

HELDOUT = Path(__file__).resolve().parents[1] / "assets" / "demo" / "heldout.txt"

CODE = '''def moving_average(values, window):
    """Mean of each run of `window` consecutive values."""
    if window <= 0:
        raise ValueError("window must be positive")
    total = sum(values[:window])
    out = [total / window]
    for i in range(window, len(values)):
        total += values[i] - values[i - window]
        out.append(total / window)
    return out


def normalise(values):
    """Scale values to [0, 1]."""
    low, high = min(values), max(values)
    span = high - low
    return [(v - low) / span for v in values]
'''

EDITS = (
    "Rename the function moving_average to rolling_mean and keep everything else the same.",
    "Add a docstring line to normalise saying that an empty list raises ValueError; repeat the code.",
    "Change the error message to 'window must be > 0' and show the whole file again.",
)


def paragraphs() -> list[str]:
    return [p.strip() for p in HELDOUT.read_text().split("\n\n") if len(p.strip()) > 200]


def prompt_set(n: int) -> list[str]:
    """n prompts, alternating a summary of a paragraph and an edit of the code."""
    paras = paragraphs()
    out = []
    for i in range(n):
        if i % 2 == 0:
            text = paras[(i // 2) % len(paras)]
            out.append(f"Summarize the following text, quoting its key sentences.\n\n{text}\n\nSummary: {text[:60]}")
        else:
            edit = EDITS[(i // 2) % len(EDITS)]
            out.append(f"{edit}\n\n```python\n{CODE}```\n\nThe edited code:\n\n```python\n")
    return out
