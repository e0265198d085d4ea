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


def with_targets(partitions: int, targets: int, **sidecar: object) -> dict[str, object]:
    doc = document(**sidecar)
    doc["namespaces"] = {"orders": {"partitions": partitions, "targets": [
        {"name": f"t{i}", "type": "memcached", "servers": ["127.0.0.1:11211"]} for i in range(targets)]}}
    return doc


def chart_limit() -> int:
    limit = yaml.safe_load(CHART_VALUES.read_text())["sidecar"]["resources"]["limits"]["memory"]
    assert limit.endswith("Mi"), limit
    return int(limit[:-2]) * MiB


def test_the_defaults_of_an_injected_pod_fit_the_charts_memory_limit() -> None:
    config = config_mod.validate(document())
    total = sum(size for _, size in worst_case(config, "all"))
    assert total <= chart_limit(), total / MiB
    # With a target over the default 16 partitions too (each partition's floor is counted).
    total = sum(size for _, size in worst_case(config_mod.validate(with_targets(16, 1)), "all"))
    assert total <= chart_limit(), total / MiB
    assert refusal(config_mod.validate(document(memory_limit=f"{chart_limit()}")), "all") is None


def test_a_config_that_could_outgrow_its_limit_is_refused_naming_what_to_lower() -> None:
    config = config_mod.validate(document(memory_limit="256MiB", drain={"max_held_bytes": "128MiB"}))
    problem = refusal(config, "all")
    assert problem is not None, problem
    assert "sidecar.drain.max_held_bytes (7/8 held entries), and half again for the apply path's copies (168 MiB)" \
        in problem, problem
    assert refusal(config, "ingress") is None  # an ingress-only sidecar holds no drain entries
    assert refusal(config_mod.validate(document(memory_limit="0", drain={"max_held_bytes": "1GiB"})), "all") is None


def test_walcar_run_refuses_to_start_over_the_limit(tmp_path: Path) -> None:
    path = tmp_path / "walcar.yaml"
    path.write_text(yaml.safe_dump(document(memory_limit="128MiB")))
    run = subprocess.run([sys.executable, "-c", "import sys; from sidecar.cli import main; sys.exit(main())",
                          "run", "--config", str(path)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 2, run
    assert "worst-case memory" in run.stderr and "128 MiB" in run.stderr, run.stderr


def test_every_partition_of_every_target_counts_its_floor() -> None:
    """Each drain partition holds room for at least one largest message twice (2.07 MiB with NATS's
    default 1 MiB max_payload), however small its share of max_held_bytes: 64 partitions may hold
    133 MiB and 1024 partitions x 3 targets 6.2 GiB, and the worst case says so."""
    floor = 2 * (1024 * 1024 + 4096) + 64 * 1024

    def drain_rows(partitions: int, targets: int) -> dict[str, int]:
        rows = worst_case(config_mod.validate(with_targets(partitions, targets)), "drain")
        return {what: size for what, size in rows if "max_held_bytes" in what}

    few = drain_rows(4, 1)  # 4 floors are under the setting: the setting bounds it
    assert sum(few.values()) == 28 * MiB * 3 // 2 + 4 * MiB, few
    many = drain_rows(64, 1)
    assert sum(many.values()) == 64 * floor * 3 // 2 + 4 * MiB, many
    huge = drain_rows(1024, 3)
    assert sum(huge.values()) == 3072 * floor * 3 // 2 + 4 * MiB, huge
    assert any("3072 partitions" in what for what in huge), huge

    problem = refusal(config_mod.validate(with_targets(64, 1, memory_limit="256MiB")), "drain")
    assert problem is not None and "64 partitions" in problem, problem
    assert refusal(config_mod.validate(with_targets(64, 1, memory_limit="256MiB")), "ingress") is None
