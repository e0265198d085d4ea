"""Config loading: good files load with defaults filled in; bad ones list every error with its path."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from sidecar import config
from sidecar.config import CassandraTarget, ConfigError, MemcachedTarget, WalTarget
from sidecar.config import files as config_files
from sidecar.units import ByteSize, Duration

ROOT = Path(__file__).resolve().parents[2]


def load_toml(tmp_path: Path, text: str) -> config.Config:
    path = tmp_path / "walcar.toml"
    path.write_text(textwrap.dedent(text))
    return config.load(path)


def errors_of(tmp_path: Path, text: str, suffix: str = ".toml") -> list[str]:
    path = tmp_path / f"walcar{suffix}"
    path.write_text(textwrap.dedent(text))
    with pytest.raises(ConfigError) as info:
        config.load(path)
    return info.value.errors


def test_example_configs_load() -> None:
    for path in sorted((ROOT / "examples").glob("*.toml")) + sorted((ROOT / "examples").glob("*.yaml")):
        cfg = config.load(path)
        assert cfg.namespaces, path


def test_defaults_and_units(tmp_path: Path) -> None:
    cfg = load_toml(
        tmp_path,
        """
        [namespaces.sessions]
        visibility_budget = "50ms"
        replay_window = "72h"
        chunk_threshold = "256KiB"
        retry = { initial_delay = "100ms", max_delay = "30s" }
        [[namespaces.sessions.targets]]
        name = "cache"
        type = "memcached"
        servers = ["127.0.0.1:21211"]
        [[namespaces.sessions.targets]]
        name = "main"
        type = "cassandra"
        contact_points = ["127.0.0.1:19042"]
        keyspace = "app"
        [[namespaces.sessions.targets]]
        name = "us-west-2"
        type = "wal"
        url = "http://walcar.us-west-2.internal:8080"
        """,
    )
    ns = cfg.namespaces["sessions"]
    assert ns.visibility_budget == pytest.approx(0.05)
    assert isinstance(ns.replay_window, Duration) and ns.replay_window == 72 * 3600
    assert isinstance(ns.chunk_threshold, ByteSize) and ns.chunk_threshold == 256 * 1024
    assert ns.retry.initial_delay == pytest.approx(0.1) and ns.retry.max_attempts == 20
    assert ns.mode == "async" and ns.partitions == 16 and ns.dlq is True
    assert [type(t) for t in ns.targets] == [MemcachedTarget, CassandraTarget, WalTarget]
    assert ns.primary_target().name == "cache"
    assert cfg.sidecar.admin == "127.0.0.1:9901"


def test_yaml_is_equivalent_to_toml(tmp_path: Path) -> None:
    path = tmp_path / "walcar.yaml"
    path.write_text(
        textwrap.dedent(
            """
            sidecar: {region: eu-west-1}
            listeners:
              - {protocol: kv, bind: "127.0.0.1:8080"}
            namespaces:
              orders:
                mode: sync
                targets:
                  - {name: db, type: cassandra, contact_points: ["127.0.0.1:9042"], keyspace: shop}
            """
        )
    )
    cfg = config.load(path)
    assert cfg.sidecar.region == "eu-west-1"
    assert cfg.namespaces["orders"].mode == "sync"
    assert cfg.namespaces["orders"].targets[0].keyspace == "shop"


def test_wrong_type_names_the_path(tmp_path: Path) -> None:
    errors = errors_of(
        tmp_path,
        """
        [namespaces.playback]
        partitions = "many"
        [[namespaces.playback.targets]]
        name = "cache"
        type = "memcached"
        servers = "127.0.0.1:11211"
        pool_size = "8"
        """,
    )
    assert errors == [
        "namespaces.playback.partitions: expected int, got str",
        "namespaces.playback.targets[0].servers: expected array, got str",
        "namespaces.playback.targets[0].pool_size: expected int, got str",
    ]


def test_unknown_keys_are_errors(tmp_path: Path) -> None:
    errors = errors_of(
        tmp_path,
        """
        [sidecar]
        regoin = "us-east-1"
        [namespaces.a]
        replay_windw = "1h"
        """,
    )
    assert errors[0].startswith("sidecar.regoin: unknown field (known: admin, admin_token_create, admin_token_file,")
    assert errors[1].startswith("namespaces.a.replay_windw: unknown field (known: chunk_threshold, dlq,")
    assert len(errors) == 2


def test_missing_target_settings(tmp_path: Path) -> None:
    errors = errors_of(
        tmp_path,
        """
        [[namespaces.a.targets]]
        name = "db"
        type = "cassandra"
        [[namespaces.a.targets]]
        name = "cache"
        [[namespaces.a.targets]]
        name = "x"
        type = "redis"
        """,
    )
    assert errors == [
        "namespaces.a.targets[0]: missing required field `contact_points`",
        "namespaces.a.targets[0]: missing required field `keyspace`",
        "namespaces.a.targets[1]: missing required field `type` "
        "(one of 'memcached', 'cassandra', 'wal', 'http', 'kafka')",
        "namespaces.a.targets[2].type: expected one of 'memcached', 'cassandra', 'wal', 'http', 'kafka', got 'redis'",
    ]


def test_bad_units_and_literals(tmp_path: Path) -> None:
    errors = errors_of(
        tmp_path,
        """
        [namespaces.a]
        mode = "eventually"
        visibility_budget = "fast"
        chunk_threshold = "lots"
        """,
    )
    assert errors == [
        "namespaces.a.mode: expected one of 'async', 'off', 'sync', got 'eventually'",
        "namespaces.a.visibility_budget: expected a duration like '50ms', '2m' or '72h', got 'fast'",
        "namespaces.a.chunk_threshold: expected a size like '256KiB' or '16MiB', got 'lots'",
    ]


def test_duplicate_listener_ports(tmp_path: Path) -> None:
    errors = errors_of(
        tmp_path,
        """
        [sidecar]
        admin = "127.0.0.1:8080"
        [[listeners]]
        protocol = "kv"
        bind = "127.0.0.1:8080"
        [[listeners]]
        protocol = "memcached"
        bind = "0.0.0.0:8080"
        namespace = "sessions"
        [namespaces.sessions]
        [[namespaces.sessions.targets]]
        name = "cache"
        type = "memcached"
        servers = ["127.0.0.1:21211"]
        """,
    )
    assert errors == [
        "listeners[1].bind: port 8080 is already used by listeners[0]",
        "sidecar.admin: port 8080 is already used by listeners[0]",
    ]


def test_semantic_errors(tmp_path: Path) -> None:
    errors = errors_of(
        tmp_path,
        """
        [[listeners]]
        protocol = "memcached"
        bind = "127.0.0.1:11211"
        [[listeners]]
        protocol = "cql"
        bind = "127.0.0.1:9042"
        namespace = "nope"
        [namespaces.Bad]
        partitions = 0
        retry = { initial_delay = "1m", max_delay = "1s", multiplier = 0.5 }
        primary = "ghost"
        [[namespaces.Bad.targets]]
        name = "c"
        type = "memcached"
        servers = ["localhost"]
        [[namespaces.Bad.targets]]
        name = "c"
        type = "wal"
        url = "walcar.example:8080"
        """,
    )
    assert errors == [
        "listeners[0]: a memcached listener needs `namespace`",
        "listeners[1].namespace: unknown namespace 'nope'",
        "namespaces.Bad: namespace names are lowercase letters, digits, '-' and '_' (<= 63)",
        "namespaces.Bad.partitions: must be between 1 and 1024, got 0",
        "namespaces.Bad.retry.multiplier: must be >= 1.0, got 0.5",
        "namespaces.Bad.retry.initial_delay: must not exceed max_delay (1s)",
        "namespaces.Bad.targets[0].servers[0]: expected host:port, got 'localhost'",
        "namespaces.Bad.targets[1].name: duplicate target name 'c' (also targets[0])",
        "namespaces.Bad.targets[1].url: expected an http:// or https:// URL, got 'walcar.example:8080'",
        "namespaces.Bad.primary: no target named 'ghost'",
    ]


def test_unparseable_file(tmp_path: Path) -> None:
    errors = errors_of(tmp_path, "[sidecar\nregion = 1\n")
    assert len(errors) == 1
    assert errors[0].endswith("not valid TOML: Expected ']' at the end of a table declaration (at line 1, column 9)")
    errors = errors_of(tmp_path, "namespaces: [unclosed\n", suffix=".yaml")
    assert "not valid YAML" in errors[0]


def test_cli_config_check(tmp_path: Path) -> None:
    good = subprocess.run(
        [sys.executable, "-m", "sidecar.cli", "config", "check", str(ROOT / "examples" / "walcar.toml")],
        capture_output=True, text=True,
    )
    assert good.returncode == 0, good.stderr
    assert 'replay_window = "72h"' in good.stdout  # defaults and units printed back
    bad = tmp_path / "bad.toml"
    bad.write_text(
        '[namespaces.playback]\n[[namespaces.playback.targets]]\n'
        'name = "x"\ntype = "memcached"\nservers = ["h:1"]\npool_size = "8"\n'
    )
    result = subprocess.run(
        [sys.executable, "-m", "sidecar.cli", "config", "check", str(bad)], capture_output=True, text=True
    )
    assert result.returncode == 2
    assert "namespaces.playback.targets[0].pool_size: expected int, got str" in result.stderr
    assert "Traceback" not in result.stderr


def test_secrets_are_redacted(tmp_path: Path) -> None:
    cfg = load_toml(tmp_path, "[namespaces.a]\n")
    data = config.to_builtins(cfg)
    assert data["namespaces"]["a"]["mode"] == "async"
    node = {"password": "hunter2", "nested": [{"token": "abc"}]}
    config_files._redact(node)
    assert node == {"password": "<redacted>", "nested": [{"token": "<redacted>"}]}


def test_a_kv_body_that_could_not_fit_its_budget_once_decoded_is_a_config_error(tmp_path: Path) -> None:
    """A decoded body holds itself and its values: max_body over half of partial_budget could never be
    held within it (a 30 MiB body took 60 MiB), so the worst-case memory would be a fiction."""
    listener = """
        [[listeners]]
        protocol = "kv"
        bind = "127.0.0.1:8080"
        """
    load_toml(tmp_path, listener)  # the defaults: 8 MiB bodies, a 16 MiB budget
    errors = errors_of(tmp_path, listener + 'max_body = "32MiB"\n')
    assert any("listeners[0].max_body" in e and "partial_budget" in e for e in errors), errors
    load_toml(tmp_path, listener + 'max_body = "32MiB"\npartial_budget = "64MiB"\n')


@pytest.mark.parametrize("value", [0, 65])
def test_pack_entries_is_bounded(tmp_path: Path, value: int) -> None:
    errors = errors_of(tmp_path, f"""
        [sidecar.journal]
        pack_entries = {value}
        [namespaces.n]
        """)
    assert errors == [f"sidecar.journal.pack_entries: must be between 1 and 64, got {value}"]
