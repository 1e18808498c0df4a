"""The import contract between stages: a stage imports only stages below it.

Every ``moesim.*`` import counts, at module level or inside a function (a lazy import hides the graph,
it does not change it). The stage folders and their import names come from pyproject.toml's package-dir
mapping, so a new stage folder must be placed in ``ORDER`` before this test passes.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    tomllib = pytest.importorskip("tomli")

REPO = Path(__file__).resolve().parents[1]

# Lowest first. "moesim" is the shared core (errors, units, model shapes, quantization arithmetic);
# "traces" is data (the bundled, checksummed trace files and their names), which the tracer's commands
# resolve, so it sits below the tracer;
# "cli" is moesim/cli.py, the command registry above every stage. quality (perplexity under quantization)
# needs only the core, and the cost model's search reads it, so it sits below the simulator. reproduce
# simulates published points with every stage's parts, so it sits above them all.
ORDER = ("moesim", "traces", "tracer", "calib", "quality", "simulator", "costmodel", "engine", "reproduce", "cli")

# The two maintenance scripts that rebuild the bundled data with the commands of the stages above it. They
# are run, never imported, so they may use the whole tool; nothing else may import upward.
KNOWN_UPWARD = {
    ("traces/convert_bundled.py", "cli"),  # runs `moesim trace import`
    ("traces/convert_bundled.py", "tracer"),  # checks what it converted with the trace reader
    ("traces/fit_bundled_routing.py", "cli"),  # runs `moesim trace fit`
    ("traces/fit_bundled_routing.py", "tracer"),  # fits the Mixtral routing model and writes routing files
}


def _stage_folders() -> dict[str, str]:
    """Import name's stage -> folder, from the package-dir mapping."""
    doc = tomllib.loads((REPO / "pyproject.toml").read_text())
    mapping = doc["tool"]["setuptools"]["package-dir"]
    return {name.split(".")[-1]: folder for name, folder in mapping.items()}


def _stage_of_file(path: Path, folders: dict[str, str]) -> str:
    rel = path.relative_to(REPO)
    for stage, folder in folders.items():
        if rel.parts[0] == folder:
            if stage == "moesim" and rel.name == "cli.py" and len(rel.parts) == 2:
                return "cli"
            return stage
    raise AssertionError(f"{rel}: not in a stage folder")


def _stage_of_module(name: str, stages: set[str]) -> str:
    parts = name.split(".")
    if len(parts) > 1 and parts[1] == "cli":
        return "cli"
    if len(parts) > 1 and parts[1] in stages:
        return parts[1]
    return "moesim"


def _imported_stages(tree: ast.AST, stages: set[str]):
    """(stage, line) of every moesim import, one per stage and import statement."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # "from moesim import tracer" imports the stage; "from moesim.tracer import x" the module
            names = [f"moesim.{a.name}" for a in node.names] if node.module == "moesim" else [node.module]
        else:
            continue  # relative imports stay inside their own package
        found = {_stage_of_module(n, stages) for n in names if n.split(".")[0] == "moesim"}
        for stage in sorted(found):
            yield stage, node.lineno


def _upward_imports() -> set[tuple[str, str, int]]:
    folders = _stage_folders()
    assert set(folders) <= set(ORDER), f"stages missing from ORDER: {set(folders) - set(ORDER)}"
    rank = {s: i for i, s in enumerate(ORDER)}
    found = set()
    for folder in sorted(set(folders.values())):
        for path in sorted((REPO / folder).rglob("*.py")):
            src = _stage_of_file(path, folders)
            for target, line in _imported_stages(ast.parse(path.read_text()), set(folders)):
                if rank[target] > rank[src]:
                    found.add((path.relative_to(REPO).as_posix(), target, line))
    return found


def test_no_stage_imports_a_stage_above_it():
    upward = _upward_imports()
    unexpected = sorted(u for u in upward if (u[0], u[1]) not in KNOWN_UPWARD)
    assert not unexpected, "imports of a higher stage (file, stage, line): " + repr(unexpected)
    stale = KNOWN_UPWARD - {(f, t) for f, t, _ in upward}
    assert not stale, f"KNOWN_UPWARD entries no import needs any more: {sorted(stale)}"


def test_the_check_sees_lazy_imports():
    tree = ast.parse("def f():\n    from moesim.engine.runner import OffloadEngine\n")
    assert list(_imported_stages(tree, {"engine", "simulator"})) == [("engine", 2)]
