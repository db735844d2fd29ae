"""The package's folders are its layers (DESIGN.md section 2): imports only flow down.

    cli -> serving -> engine -> worker -> {offload, checkpoint} -> model -> {attention, distributed}

`distributed` (tensor-parallel groups, sharding arithmetic, the collectives a step needs, rank
launch) sits beside `attention` at the bottom: the decoder (model) sums its row-parallel
outputs through it and everything above shards with it, while it imports only torch and config
(the rank launcher is handed the worker's command loop as a function).

`config` and `progress` are usable from anywhere; `bench` sits beside `serving` (above
the engine it drives, below the cli that starts it). Every module's imports are read
with `ast`, so nothing is imported to check them. Imports under `if TYPE_CHECKING:`
count too: a type-only upward import is still an upward dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "aioffload"

# Higher rank = higher layer. A module may import from its own layer or any lower one.
RANK = {
    "attention": 0,
    "distributed": 0,
    "model": 1,
    "offload": 2,
    "checkpoint": 2,
    "worker": 3,
    "engine": 4,
    "serving": 5,
    "bench": 5,
    "cli": 6,
}
ANYWHERE = {"config", "progress", "assets"}
# Same rank, different layer: siblings must not lean on each other either.
SIBLINGS_APART = {
    frozenset({"offload", "checkpoint"}),
    frozenset({"serving", "bench"}),
    frozenset({"attention", "distributed"}),
}


def layer_of(module: str) -> str | None:
    """'aioffload.worker.sampling' -> 'worker'; the package itself -> None."""
    parts = module.split(".")
    if parts[0] != "aioffload" or len(parts) < 2:
        return None
    return parts[1]


def module_name(path: Path, root: Path = PACKAGE) -> str:
    rel = path.relative_to(root.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(path: Path, root: Path = PACKAGE) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in the file, relative ones resolved."""
    tree = ast.parse(path.read_text(), filename=str(path))
    here = module_name(path, root).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    out: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod == "aioffload" or (node.level and not node.module):
                out += [(node.lineno, f"{mod}.{a.name}") for a in node.names]  # from aioffload import engine
            else:
                out.append((node.lineno, mod))
    return out


def violations(root: Path = PACKAGE) -> list[str]:
    bad = []
    for path in sorted(root.rglob("*.py")):
        mine = layer_of(module_name(path, root))
        if mine is None or mine in ANYWHERE:
            continue
        for line, mod in imported_modules(path, root):
            theirs = layer_of(mod)
            if theirs is None or theirs == mine or theirs in ANYWHERE:
                continue
            if theirs not in RANK:
                bad.append(f"{path.relative_to(root.parent)}:{line}: imports {mod}, which is in no known layer")
            elif RANK[theirs] > RANK[mine] or frozenset({mine, theirs}) in SIBLINGS_APART:
                bad.append(
                    f"{path.relative_to(root.parent)}:{line}: {mine} imports {mod} ({theirs} is not below {mine})"
                )
    return bad


def test_every_import_flows_down() -> None:
    found = violations()
    assert not found, "imports that go up a layer:\n" + "\n".join(found)


def test_every_top_level_entry_is_a_known_layer() -> None:
    entries = {p.stem for p in PACKAGE.iterdir() if (p.suffix == ".py" or p.is_dir()) and p.name != "__pycache__"}
    entries.discard("__init__")
    assert entries <= set(RANK) | ANYWHERE, entries - set(RANK) - ANYWHERE


@pytest.mark.parametrize(
    ("layer", "statement", "offender"),
    [
        ("attention/kv_cache.py", "from aioffload.engine.scheduler import Scheduler", "aioffload.engine.scheduler"),
        ("model/ops.py", "import aioffload.worker.sampling", "aioffload.worker.sampling"),
        ("worker/inputs.py", "from aioffload import serving", "aioffload.serving"),
        ("offload/placement.py", "from aioffload.checkpoint import tokenizer", "aioffload.checkpoint"),
        ("engine/request.py", "from ..serving.protocol import ApiError", "aioffload.serving.protocol"),
        ("distributed/launch.py", "from aioffload.worker.follower import follow", "aioffload.worker.follower"),
        ("distributed/group.py", "from aioffload.attention.kv_cache import KVCache", "aioffload.attention.kv_cache"),
    ],
)
def test_an_upward_import_is_named(tmp_path: Path, layer: str, statement: str, offender: str) -> None:
    """A copy of the package with one planted upward (or sideways) import fails, naming it."""
    copy = tmp_path / "aioffload"
    for src in PACKAGE.rglob("*.py"):
        dst = copy / src.relative_to(PACKAGE)
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_text(src.read_text())
    target = copy / layer
    target.write_text(target.read_text() + f"\n{statement}\n")
    found = violations(copy)
    assert len(found) == 1
    assert found[0].startswith(f"aioffload/{layer}:") and offender in found[0]


def test_type_checking_imports_count(tmp_path: Path) -> None:
    pkg = tmp_path / "aioffload" / "model"
    pkg.mkdir(parents=True)
    source = "from typing import TYPE_CHECKING\n\nif TYPE_CHECKING:\n    from aioffload.engine import y\n"
    (pkg / "x.py").write_text(source)
    assert violations(tmp_path / "aioffload") == [
        "aioffload/model/x.py:4: model imports aioffload.engine (engine is not below model)"
    ]
