"""The lint rules configured in pyproject.toml ([tool.ruff]) hold on the whole repository, so a
change that breaks them fails the test suite (and CI), not only a local pre-commit habit."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_is_clean():
    r = subprocess.run([sys.executable, "-m", "ruff", "check", "sdekit", "tests", "benchmarks",
                        "examples"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
