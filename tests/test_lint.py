"""The lint rules ([tool.ruff]) and the type checker ([tool.mypy]) configured in pyproject.toml
hold, so a change that breaks them fails the test suite (and CI), not only a local pre-commit
habit."""
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
