"""The worst-case memory sum: what `walcar run` refuses to start with, and that the defaults fit the chart."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

from sidecar import config as config_mod
from sidecar.memory_budget import refusal, worst_case

MiB = 1024 * 1024
CHART_VALUES = Path(__file__).resolve().parents[2] / "helm" / "walcar" / "values.yaml"


def document(**sidecar: object) -> dict[str, object]:
    return {"sidecar": {"nats_url": "nats://127.0.0.1:4222", **sidecar},
            "namespaces": {"orders": {}},
            "listeners": [{"protocol": "kv", "bind": "127.0.0.1:8080", "namespace": "orders"}]}


def chart_limit() -> int:
    limit = yaml.safe_load(CHART_VALUES.read_text())["sidecar"]["resources"]["limits"]["memory"]
    assert limit.endswith("Mi"), limit
    return int(limit[:-2]) * MiB


def test_the_defaults_of_an_injected_pod_fit_the_charts_memory_limit() -> None:
    config = config_mod.validate(document())
    total = sum(size for _, size in worst_case(config, "all"))
    assert total <= chart_limit(), total / MiB
    assert refusal(config_mod.validate(document(memory_limit=f"{chart_limit()}")), "all") is None


def test_a_config_that_could_outgrow_its_limit_is_refused_naming_what_to_lower() -> None:
    config = config_mod.validate(document(memory_limit="256MiB", drain={"max_held_bytes": "128MiB"}))
    problem = refusal(config, "all")
    assert problem is not None, problem
    assert "sidecar.drain.max_held_bytes, and half again for the apply path's copies (192 MiB)" in problem, problem
    assert refusal(config, "ingress") is None  # an ingress-only sidecar holds no drain entries
    assert refusal(config_mod.validate(document(memory_limit="0", drain={"max_held_bytes": "1GiB"})), "all") is None


def test_walcar_run_refuses_to_start_over_the_limit(tmp_path: Path) -> None:
    path = tmp_path / "walcar.yaml"
    path.write_text(yaml.safe_dump(document(memory_limit="128MiB")))
    run = subprocess.run([sys.executable, "-c", "import sys; from sidecar.cli import main; sys.exit(main())",
                          "run", "--config", str(path)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 2, run
    assert "worst-case memory" in run.stderr and "128 MiB" in run.stderr, run.stderr
