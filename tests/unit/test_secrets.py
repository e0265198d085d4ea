"""Redaction, loopback detection and token files (sidecar/secrets.py)."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from sidecar import config as config_mod
from sidecar.logs import LogfmtFormatter
from sidecar.secrets import SecretFileError, bearer_matches, is_loopback, read_token_file, redact_urls


@pytest.mark.parametrize(("text", "shown"), [
    ("nats://alice:secret@nats:4222", "nats://<redacted>@nats:4222"),
    ("https://tok3n@walcar.eu.internal/x", "https://<redacted>@walcar.eu.internal/x"),
    ("a nats://u:p@h:1,nats://v:q@i:2 b", "a nats://<redacted>@h:1,nats://<redacted>@i:2 b"),
    ("nats://127.0.0.1:4222", "nats://127.0.0.1:4222"),
    ("nats://alice:p@ssw0rd@127.0.0.1:14222", "nats://<redacted>@127.0.0.1:14222"),
    ('url="nats://a:it\'s\"x@h:1"', 'url="nats://<redacted>@h:1"'),
    ("mail me: ops@example.com", "mail me: ops@example.com"),
])
def test_credentials_in_urls_are_redacted(text: str, shown: str) -> None:
    assert redact_urls(text) == shown


def test_config_output_and_errors_hide_url_credentials() -> None:
    document = {"sidecar": {"nats_url": "nats://alice:s3cret@127.0.0.1:4222"},
                "namespaces": {"a": {"targets": [{"type": "wal", "name": "eu", "url": "ftp://bob:pw@x"}]}}}
    with pytest.raises(config_mod.ConfigError) as caught:
        config_mod.validate(document)
    assert "pw" not in str(caught.value) and "<redacted>" in str(caught.value)
    document["namespaces"]["a"]["targets"][0]["url"] = "https://bob:pw@x"
    text = config_mod.dumps(config_mod.validate(document), "json")
    assert "s3cret" not in text and "bob:pw" not in text and "nats://<redacted>@127.0.0.1:4222" in text


def test_log_lines_hide_url_credentials() -> None:
    import logging

    record = logging.LogRecord("walcar.x", logging.INFO, "", 0, "journal_ready", (), None)
    record.nats_url = "nats://alice:s3cret@h:4222"
    assert "s3cret" not in LogfmtFormatter().format(record)


@pytest.mark.parametrize(("host", "loopback"), [
    ("127.0.0.1", True), ("127.3.2.1", True), ("::1", True), ("[::1]", True), ("localhost", True),
    ("0.0.0.0", False), ("::", False), ("10.0.0.1", False), ("walcar.svc", False), ("", False),
])
def test_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_admin_beyond_loopback_needs_a_token() -> None:
    with pytest.raises(config_mod.ConfigError) as caught:
        config_mod.validate({"sidecar": {"admin": "0.0.0.0:9901"}})
    assert caught.value.errors[0].startswith("sidecar.admin: admin on 0.0.0.0 (beyond loopback) needs")
    config_mod.validate({"sidecar": {"admin": "0.0.0.0:9901", "admin_token_file": "/t"}})
    config_mod.validate({"sidecar": {"admin": "[::1]:9901"}})


def test_token_files(tmp_path: Path) -> None:
    made = tmp_path / "run" / "admin.token"
    token = read_token_file(str(made), create=True)
    assert len(token) >= 32 and made.read_text().strip() == token
    assert stat.S_IMODE(made.stat().st_mode) == 0o600
    assert read_token_file(str(made), create=True) == token  # kept, not remade
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(SecretFileError, match="empty"):
        read_token_file(str(tmp_path / "empty"))
    with pytest.raises(SecretFileError, match="cannot read"):
        read_token_file(str(tmp_path / "missing"))


def test_bearer_matching() -> None:
    assert bearer_matches(b"Bearer abc", "abc")
    assert not bearer_matches(b"Bearer abd", "abc")
    assert not bearer_matches(b"abc", "abc")
    assert not bearer_matches(None, "abc")
    assert not bearer_matches(b"Bearer ", "")
