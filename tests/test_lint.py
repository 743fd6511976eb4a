"""The lint rules ([tool.ruff]) and the type checker ([tool.mypy]) configured in pyproject.toml
hold, so a change that breaks them fails the test suite (and CI), not only a local pre-commit
habit."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_is_clean():
    r = subprocess.run([sys.executable, "-m", "ruff", "check", "sdekit", "tests", "benchmarks",
                        "examples"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_mypy_is_clean_on_sdekit():
    """The type checker configured in pyproject.toml ([tool.mypy]: sdekit/) finds no error."""
    pytest.importorskip("mypy", reason="mypy is in the test extra: pip install -e .[test]")
    r = subprocess.run([sys.executable, "-m", "mypy"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-5000:] + r.stderr[-2000:]


def _long_functions(root: Path, limit: int = 60) -> list[tuple[str, int, str, int]]:
    """``(file, line, name, length)`` of every function longer than ``limit`` lines, not
    counting its docstring, that no comment block directly above it (or above its
    decorators) beginning ``# over 60 lines: <why>`` justifies."""
    out = []
    for path in sorted(root.rglob("*.py")):
        lines = path.read_text().splitlines()
        for node in ast.walk(ast.parse("\n".join(lines))):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            n = node.end_lineno - node.lineno + 1
            doc = node.body[0] if node.body else None
            if (isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant)
                    and isinstance(doc.value.value, str)):
                n -= doc.end_lineno - doc.lineno + 1
            k = min([node.lineno] + [d.lineno for d in node.decorator_list]) - 2
            comment = []   # the comment block directly above
            while k >= 0 and lines[k].strip().startswith("#"):
                comment.insert(0, lines[k].strip())
                k -= 1
            if n > limit and not (comment and comment[0].startswith("# over 60 lines")):
                out.append((str(path.relative_to(root.parent)), node.lineno, node.name, n))
    return out


def test_long_functions_are_justified(tmp_path):
    """Issue 13's habit: a function over 60 lines is split into named steps, or says why not
    in a comment directly above it."""
    assert _long_functions(ROOT / "sdekit") == []
    (tmp_path / "m.py").write_text("def f():\n" + "    x = 1\n" * 61)
    assert [r[2:] for r in _long_functions(tmp_path)] == [("f", 62)]
    (tmp_path / "m.py").write_text("# over 60 lines: a table\ndef f():\n" + "    x = 1\n" * 61)
    assert _long_functions(tmp_path) == []
