"""How the ingress builds an entry: write times a target can order by, and checks that follow a live config change."""

from __future__ import annotations

import msgspec
import pytest

from sidecar import ingress as ingress_module
from sidecar.envelope import Op
from sidecar.ingress import Ingress, TooLarge
from tests.support.sidecar import build_config, sidecar_document


def make_ingress(**namespace: object) -> Ingress:
    config = build_config(sidecar_document("nats://127.0.0.1:4222", {"ns": {"partitions": 2, **namespace}}))
    return Ingress(config, journal=None)  # type: ignore[arg-type]  # building entries never touches it


def test_writes_in_one_microsecond_get_increasing_write_times(monkeypatch: pytest.MonkeyPatch) -> None:
    """Cassandra settles a write-timestamp tie by comparing values, not by order: a key's later write
    must carry the later time even when the clock has not moved."""
    ingress = make_ingress()
    monkeypatch.setattr(ingress_module, "now_us", lambda: 1_700_000_000_000_000)
    stamps = [ingress.entry("ns", Op.PUT, "k", value=b"v").write_time for _ in range(5)]
    assert stamps == [1_700_000_000_000_000 + n for n in range(5)]
    # A write time the client gives (within the drift bound) is kept as it is.
    assert ingress.entry("ns", Op.PUT, "k", value=b"v", write_time=1_699_999_999_000_000).write_time \
        == 1_699_999_999_000_000


def test_a_changed_namespace_limit_applies_to_the_next_entry() -> None:
    ingress = make_ingress(max_item_size=100)
    ingress.entry("ns", Op.PUT, "k", value=b"x" * 60)
    namespaces = ingress.config.namespaces
    namespaces["ns"] = msgspec.structs.replace(namespaces["ns"], max_item_size=50)  # as a config reload does
    with pytest.raises(TooLarge):
        ingress.entry("ns", Op.PUT, "k", value=b"x" * 60)
