"""Runtime dependencies are exactly what the package imports (issue 10).

The test extras pull in numpy (through transformers), so a runtime-only gap hides in the
main suite: these checks read every import with `ast` and run the demo model with numpy
blocked. `make smoke` checks the same from a clean, runtime-only venv.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "aioffload"

# Imported only on the paths that need them (inside a function, or in a module imported lazily,
# e.g. the Triton kernels on CUDA), each with where it comes from. test_generate_runs_with_numpy_blocked
# and `make smoke` catch one that leaks onto the CPU start-up path.
OPTIONAL = {
    "triton": "CUDA kernels: ships with CUDA builds of torch (CPU tests install it as an extra)",
    "xformers": "the xformers attention backend: the `xformers` extra",
    "transformers": "the Hugging Face baseline of `aioffload bench`: GPU machine only",
    "accelerate": "the Accelerate baseline of `aioffload bench offload`: GPU machine only",
}
IMPORT_NAME = {"prometheus-client": "prometheus_client"}  # distribution -> module, where they differ


def _imports(path: Path) -> list[str]:
    """The top-level module name of every absolute import in the file."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out += [a.name.split(".")[0] for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append(node.module.split(".")[0])
    return out


def _declared() -> set[str]:
    """[project] dependencies of pyproject.toml (read with a regex: tomllib needs Python 3.11)."""
    block = re.search(r"^dependencies = \[(.*?)^\]", (REPO / "pyproject.toml").read_text(), re.M | re.S)
    assert block is not None, "no [project] dependencies list in pyproject.toml"
    deps = re.findall(r'"([^"]+)"', block.group(1))
    names = {re.split(r"[<>=!~;\[ ]", d, maxsplit=1)[0].strip().lower() for d in deps}
    return {IMPORT_NAME.get(n, n.replace("-", "_")) for n in names}


def test_declared_runtime_dependencies_are_exactly_the_imported_ones() -> None:
    third_party: dict[str, list[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        for name in _imports(path):
            if name not in sys.stdlib_module_names and name not in ("aioffload", "__future__"):
                third_party.setdefault(name, []).append(str(path.relative_to(REPO)))
    required = set(third_party) - set(OPTIONAL)
    declared = _declared()
    assert required - declared == set(), {n: third_party[n] for n in required - declared}
    assert declared - required == set(), f"declared in pyproject.toml but never imported: {declared - required}"


def test_generate_runs_with_numpy_blocked() -> None:
    code = (
        "import sys; sys.modules['numpy'] = None  # as in a venv without numpy\n"
        "from aioffload.cli import main\n"
        "sys.exit(main(['generate', '--prompt', 'The Python tutorial', '--max-tokens', '6']))\n"
    )
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout.strip()
    assert out.startswith("The Python tutorial") and len(out) > len("The Python tutorial"), out


def test_tensor_parallel_reads_and_streamed_experts_run_with_numpy_blocked(tmp_path: Path) -> None:
    """The two other run-time paths that read host memory as bytes: a shard's row slice read from
    safetensors (tensor parallelism) and routed expert streaming (its per-layer routed ids)."""
    import torch
    from safetensors.torch import save_file

    from aioffload.checkpoint.checkpoint import Checkpoint
    from aioffload.model.layout import expert_layout
    from tests.tiny_models import add_word_tokenizer, make_moe_checkpoint

    save_file({"x": torch.arange(60, dtype=torch.float32).view(6, 10)}, tmp_path / "t.safetensors")
    moe = add_word_tokenizer(make_moe_checkpoint(tmp_path / "moe", "qwen2_moe-e5-top2-shared", seed=5))
    cfg = Checkpoint.open(str(moe)).model_config
    gb = 8 * expert_layout(cfg).numel * 4 / 1e9  # 8 experts on the host, as test_moe_engine does
    code = (
        "import sys; sys.modules['numpy'] = None  # as in a venv without numpy\n"
        "import torch\n"
        "from aioffload.checkpoint.safetensors_io import read_header\n"
        "from aioffload.checkpoint.shard_read import read_slice_into\n"
        "from aioffload.distributed.sharding import Slice\n"
        f"rows = torch.empty(2, 10); read_slice_into(read_header({str(tmp_path / 't.safetensors')!r})['x'], rows, "
        "Slice(0, 3, 5))\n"
        "print('rows', rows[:, 0].tolist())\n"
        "from aioffload.cli import main\n"
        f"sys.exit(main(['generate', '--model', {str(moe)!r}, '--prompt', 'w5 w6 w7', '--max-tokens', '4',\n"
        f"               '--device', 'cpu', '--cpu-offload-gb', '{gb}', '--expert-stream', 'routed']))\n"
    )
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "rows [30.0, 40.0]" in proc.stdout
    assert proc.stdout.splitlines()[-1].startswith("w5 w6 w7"), proc.stdout
