"""sidecar/ type-checks clean under mypy (configured in pyproject.toml): a type error fails CI like a test."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_mypy_finds_no_error() -> None:
    assert importlib.util.find_spec("mypy") is not None, "mypy is part of the [test] extras: pip install -e '.[test]'"
    # The files, strictness and per-module settings come from [tool.mypy]; only the target is named here.
    result = subprocess.run([sys.executable, "-m", "mypy", "sidecar"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Success: no issues found" in result.stdout
