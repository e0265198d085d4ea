"""The tree stays ruff-clean: lint failures fail CI like any other regression."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_ruff_clean() -> None:
    ruff = shutil.which("ruff")
    assert ruff, "ruff is part of the [test] extras"
    result = subprocess.run([ruff, "check", "--quiet", "sidecar", "tests", "bench"], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
