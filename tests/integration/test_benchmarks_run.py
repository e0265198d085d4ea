"""Every benchmark under bench/ still runs end to end (tiny sizes, nothing recorded).

Benchmarks are not tests, but a broken one is found only when someone needs its numbers:
the CQL one stopped at its first connect for a day after a driver setup change."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.services import Services

ROOT = Path(__file__).resolve().parents[2]

TINY = {
    "cql": ["--ops", "300", "--rounds", "1", "--clients", "1,2", "--rate", "200", "--latency-seconds", "0.5"],
    "memcached": ["--seconds", "1", "--latency-seconds", "0.5"],
    "fronts": ["--connections", "4", "--value-mb", "2", "--hold", "1"],
    "drain": ["--entries", "2000", "--keys", "200", "--small", "1000"],
    "drain_memory": ["--backlog-mb", "20", "--down-seconds", "2"],
    "overlay": ["--seconds", "1", "--rounds", "1", "--latency-seconds", "0.5"],
    "journal": ["--messages", "2000", "--clients", "2", "--rounds", "1", "--http-seconds", "0.5"],
    "replay": ["--entries", "2000", "--writes-per-key", "4"],
    "replication": ["--rate", "100", "--seconds", "2", "--backlog", "1000"],
    "targets": ["--entries", "2000", "--http-entries", "300", "--keys", "100"],
    "kv": ["--seconds", "1", "--repeat", "1", "--conns", "1", "--batch", "10"],
}
NEEDS = {"kv": "wrk"}  # a load client from the distribution's packages (Debian: apt-get install wrk)


@pytest.mark.parametrize("bench", sorted(TINY))
def test_benchmark_runs_and_prints_its_table(bench: str, services: Services, tmp_path: Path) -> None:
    if bench in NEEDS and shutil.which(NEEDS[bench]) is None:
        pytest.skip(f"bench/{bench} needs {NEEDS[bench]}")
    docs = (ROOT / "docs" / "benchmarks.md").read_text()
    result = subprocess.run([sys.executable, str(ROOT / "bench" / bench / "run.py"), *TINY[bench]],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    assert "|---" in result.stdout  # the results table
    assert (ROOT / "docs" / "benchmarks.md").read_text() == docs  # without --record nothing is written


# Comparisons that print lines rather than a table (A/B runs, measurements behind a decision).
TINY_AB = {
    "drain/ack_policies.py": ["--messages", "2000", "--rounds", "1"],
    "journal/batch_acks.py": ["--messages", "2000", "--rounds", "1"],
    "memcached/run.py": ["--ab-mux", "1", "--seconds", "1", "--latency-seconds", "0.5"],
}


@pytest.mark.parametrize("script", sorted(TINY_AB))
def test_comparison_runs_and_prints_its_medians(script: str, services: Services, tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, str(ROOT / "bench" / script), *TINY_AB[script]],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    assert "median" in result.stdout, output[-3000:]
