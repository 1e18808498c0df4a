"""Each rule in one house (issue #13): no block of code written twice across the stages that drive the same
decisions, and no function too long to read.

The duplicate check reads the sources as tokens: a line's shape is its tokens with every name, string and
number replaced by a placeholder, so a block copied and renamed still matches. Blank lines, comments,
imports, decorators, class lines, typed fields and lines of lone brackets are passed over: their shapes
recur in every dataclass and say nothing about a copied rule.
"""

from __future__ import annotations

import ast
import io
import keyword
import tokenize
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MIN_LINES = 6
# Stage pairs whose code must not repeat: the real engine and the cost model both mirror the simulator.
PAIRS = (("engine", "simulator"), ("costmodel", "simulator"))
MAX_FUNCTION_LINES = 120
LONG_FUNCTIONS_ALLOWED: set[tuple[str, str]] = set()  # (file, function) pairs excused from the length rule: none


def _line_shapes(source: str) -> list[tuple[int, str]]:
    """(line number, shape) of each line that counts, in order."""
    shapes: dict[int, list[str]] = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.NAME:
            text = tok.string if keyword.iskeyword(tok.string) else "N"
        elif tok.type == tokenize.STRING:
            text = "S"
        elif tok.type == tokenize.NUMBER:
            text = "0"
        elif tok.type == tokenize.OP:
            text = tok.string
        else:
            continue  # comments, newlines, indentation
        shapes.setdefault(tok.start[0], []).append(text)
    out = []
    for line, toks in sorted(shapes.items()):
        if toks[0] in ("import", "from", "@") or all(t in ")]}:,([{" for t in toks) or toks == ["S"]:
            continue  # imports, decorators, lone brackets, docstrings
        if toks[:2] == ["N", ":"] or toks[:2] == ["class", "N"]:
            continue  # a typed field or a class line: every dataclass has the same shape
        out.append((line, " ".join(toks)))
    return out


def _windows(files: list[Path]) -> dict[tuple[str, ...], list[str]]:
    """Every run of MIN_LINES counted lines, by shape -> where it stands."""
    found: dict[tuple[str, ...], list[str]] = {}
    for path in files:
        lines = _line_shapes(path.read_text())
        for i in range(len(lines) - MIN_LINES + 1):
            run = lines[i:i + MIN_LINES]
            shape = tuple(s for _, s in run)
            if len(set(shape)) < 3:
                continue  # a run of one repeated line (field lists, argument lists) says nothing
            where = path.relative_to(REPO) if path.is_relative_to(REPO) else path
            found.setdefault(shape, []).append(f"{where}:{run[0][0]}-{run[-1][0]}")
    return found


def _shared(a: str, b: str) -> list[str]:
    left = _windows(sorted((REPO / a).rglob("*.py")))
    right = _windows(sorted((REPO / b).rglob("*.py")))
    return sorted(f"{left[s][0]} ~ {right[s][0]}" for s in set(left) & set(right))


def test_no_block_is_written_twice_across_the_stages_that_mirror_the_simulator():
    for a, b in PAIRS:
        shared = _shared(a, b)
        assert not shared, f"blocks of {MIN_LINES}+ lines shared between {a}/ and {b}/: {shared[:10]}"


def test_the_check_sees_a_renamed_copy(tmp_path):
    block = ("def f(a, b):\n    total = a + b\n    if total > 3:\n        total -= 1\n    out = [total] * 2\n"
             "    out.append(b)\n    return out, total\n")
    renamed = block.replace("total", "acc").replace("out", "res").replace("3", "7")
    one, two = tmp_path / "one.py", tmp_path / "two.py"
    one.write_text(block)
    two.write_text("x = 1\n" + renamed)
    assert set(_windows([one])) & set(_windows([two]))
    two.write_text(renamed.replace("acc -= 1", "acc = acc // 2"))
    assert not set(_windows([one])) & set(_windows([two]))


def test_no_function_is_too_long_to_read():
    long = []
    for folder in ("moesim", "tracer", "traces", "calib", "quality", "simulator", "costmodel", "engine", "reproduce"):
        for path in sorted((REPO / folder).rglob("*.py")):
            rel = path.relative_to(REPO).as_posix()
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    n = node.end_lineno - node.lineno + 1
                    if n > MAX_FUNCTION_LINES and (rel, node.name) not in LONG_FUNCTIONS_ALLOWED:
                        long.append(f"{rel}:{node.lineno} {node.name} ({n} lines)")
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"
