"""The link's server pool and the TLS/auth settings, without a network."""

from __future__ import annotations

import pytest

from sidecar import config as config_mod
from sidecar.log.pool import RECONNECT_JITTER, RECONNECT_MAX, RECONNECT_WAIT, Server, ServerPool, backoff


def test_backoff_grows_to_a_cap_and_is_jittered() -> None:
    first = [backoff(1) for _ in range(200)]
    assert all(RECONNECT_WAIT <= w <= RECONNECT_WAIT + RECONNECT_JITTER for w in first)
    assert len({round(w, 6) for w in first}) > 100  # spread out, not a wave
    assert all(RECONNECT_MAX <= backoff(50) <= RECONNECT_MAX + RECONNECT_JITTER for _ in range(50))


def test_discovered_servers_join_once_and_keep_the_tls_name() -> None:
    pool = ServerPool("tls://nats-0.nats:4222", randomize=False)
    current = pool.servers[0]
    added = pool.discover(["10.0.0.2:4222", "10.0.0.3:4222", "nats-0.nats:4222"], current)
    assert {s.address for s in added} == {("10.0.0.2", 4222), ("10.0.0.3", 4222)}
    assert all(s.tls and s.discovered and s.tls_name == "nats-0.nats" for s in added)
    assert pool.discover(["10.0.0.2:4222"], current) == []
    assert len(pool) == 3


def test_a_lame_duck_is_passed_over_while_another_server_is_left() -> None:
    pool = ServerPool("nats://a:1,nats://b:2", randomize=False)
    pool.lame_duck(Server("a", 1, False))
    assert {pool.pick().host for _ in range(4)} == {"b"}
    pool.lame_duck(Server("b", 2, False))
    assert pool.pick().host in ("a", "b")  # all lame: still connect somewhere


def test_urls_with_credentials_are_redacted_in_the_effective_config() -> None:
    config = config_mod.validate({"sidecar": {"nats_url": "nats://walcar:s3cret@a:4222,nats://tok@b:4222"}})
    shown = config_mod.dumps(config, "json")
    assert "s3cret" not in shown and "tok@" not in shown and "nats://<redacted>@a:4222" in shown


def test_tls_settings_are_checked_by_type() -> None:
    with pytest.raises(config_mod.ConfigError, match=r"sidecar.nats_tls.handshake_first: expected bool"):
        config_mod.validate({"sidecar": {"nats_tls": {"handshake_first": "yes"}}})
    with pytest.raises(config_mod.ConfigError, match="set cert_file too"):
        config_mod.validate({"sidecar": {"nats_tls": {"key_file": "k.pem"}}})
    with pytest.raises(config_mod.ConfigError, match="only a kv listener serves TLS"):
        config_mod.validate({"listeners": [{"protocol": "memcached", "bind": "127.0.0.1:1", "namespace": "a",
                                            "tls": {"cert_file": "c", "key_file": "k"}}],
                             "namespaces": {"a": {"targets": [{"name": "m", "type": "memcached",
                                                               "servers": ["127.0.0.1:2"]}]}}})
