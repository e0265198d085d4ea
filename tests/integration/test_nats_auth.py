"""walcar against nats-servers that authenticate: user/password, token, nkey/JWT creds.

Each server puts walcar in an account of its own with JetStream enabled and, for the
password user, permissions that allow only walcar's subjects (tests/support/natsconf.py,
the set docs/security.md documents). Secrets come from files and never reach a log line.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import tomli_w

from tests.support.natsconf import account_block, configured_nats, walcar_permissions
from tests.support.procs import NatsProcess, wait_for
from tests.support.sidecar import SidecarProcess, kv_listener, sidecar_document

PASSWORD = "pw-3f9a1c-not-in-logs"
TOKEN = "tok-77e2b0-not-in-logs"


def exercise(nats: NatsProcess, tmp_path: Path, services, unique: str, url: str | None = None,
             **auth: str) -> SidecarProcess:
    """A sync write (journal, drain, applied notice) and a chunked one (object store), read back."""
    listener = kv_listener()
    cache = f"{services.memcached[0]}:{services.memcached[1]}"
    document = sidecar_document(
        url or nats.url,
        {unique: {"mode": "sync", "partitions": 2, "chunk_threshold": "1KiB",
                  "targets": [{"name": "cache", "type": "memcached", "servers": [cache]}]}},
        [listener], **auth)
    walcar = SidecarProcess(document, tmp_path / "walcar").start()
    try:
        with httpx.Client(base_url=f"http://{listener['bind']}", timeout=10) as client:
            for record, text in (("small", "ada"), ("large", "x" * 4096)):
                put = client.put(f"/v1/kv/{unique}/{record}", json={"items": [{"key": "v", "text": text}]})
                assert put.status_code == 200 and put.json()["durable"] == "true", put.text
            # drained (pull, ack, applied notice, chunk fetched from the object store) and read back
            for record in ("small", "large"):
                wait_for(lambda r=record: client.get(f"/v1/kv/{unique}/{r}?items=v").status_code == 200, 30,
                         what=f"{record} to be drained")
        with httpx.Client(timeout=10) as admin:
            assert admin.get(f"{walcar.admin}/v1/drain").status_code == 200
    finally:
        walcar.stop()
    server_log = nats.logfile.read_text()
    assert "Permissions Violation" not in server_log, server_log[-3000:]
    for secret in (PASSWORD, TOKEN):
        assert secret not in walcar.log()
    return walcar


def secret_file(tmp_path: Path, name: str, value: str) -> str:
    path = tmp_path / name
    path.write_text(value + "\n")
    path.chmod(0o600)
    return str(path)


def test_user_and_password_file_with_only_walcars_permissions(tmp_path: Path, services, unique: str) -> None:
    user = f'      {{ user: walcar, password: "{PASSWORD}", {walcar_permissions()} }}'
    nats = configured_nats(tmp_path / "nats", account_block(user))
    nats.start()
    try:
        exercise(nats, tmp_path, services, unique, nats_user="walcar",
                 nats_password_file=secret_file(tmp_path, "nats.password", PASSWORD))
    finally:
        nats.stop()


def test_credentials_in_the_url_never_reach_the_log(tmp_path: Path, services, unique: str) -> None:
    nats = configured_nats(tmp_path / "nats", account_block(f'      {{ user: walcar, password: "{PASSWORD}" }}'))
    nats.start()
    try:
        walcar = exercise(nats, tmp_path, services, unique, url=f"nats://walcar:{PASSWORD}@127.0.0.1:{nats.port}")
        assert "nats://<redacted>@127.0.0.1" in walcar.log()
    finally:
        nats.stop()


def test_a_wrong_password_stops_walcar_at_once_naming_the_refusal(tmp_path: Path, services) -> None:
    nats = configured_nats(tmp_path / "nats", account_block(f'      {{ user: walcar, password: "{PASSWORD}" }}'))
    nats.start()
    try:
        document = sidecar_document(nats.url, {}, nats_user="walcar",
                                    nats_password_file=secret_file(tmp_path, "pw", "wrong"))
        walcar = SidecarProcess(document, tmp_path / "walcar").start(wait_ready=False)
        assert walcar.proc is not None
        assert walcar.proc.wait(30) != 0
        assert "Authorization Violation" in walcar.log()
    finally:
        nats.stop()


def test_token_file(tmp_path: Path, services, unique: str) -> None:
    nats = configured_nats(tmp_path / "nats", f'authorization {{ token: "{TOKEN}" }}\n')
    nats.start()
    try:
        exercise(nats, tmp_path, services, unique, nats_token_file=secret_file(tmp_path, "nats.token", TOKEN))
    finally:
        nats.stop()


def test_a_missing_secret_file_is_named(tmp_path: Path) -> None:
    document = sidecar_document("nats://127.0.0.1:1", {}, nats_token_file=str(tmp_path / "absent"))
    walcar = SidecarProcess(document, tmp_path / "walcar").start(wait_ready=False)
    assert walcar.proc is not None and walcar.proc.wait(30) != 0
    assert f"sidecar.nats_token_file: {tmp_path / 'absent'}" in walcar.log()


def test_config_refuses_two_ways_to_authenticate() -> None:
    from sidecar import config as config_mod

    with pytest.raises(config_mod.ConfigError, match="not several"):
        config_mod.validate({"sidecar": {"nats_token_file": "a", "nats_creds": "b"}})
    with pytest.raises(config_mod.ConfigError, match="go together"):
        config_mod.validate({"sidecar": {"nats_user": "walcar"}})




def test_nkey_jwt_creds_file_in_operator_mode(tmp_path: Path, services, unique: str) -> None:
    from tests.support.natsjwt import operator_setup

    body, creds = operator_setup(tmp_path)
    nats = configured_nats(tmp_path / "nats", body)
    nats.start()
    try:
        exercise(nats, tmp_path, services, unique, nats_creds=str(creds))
    finally:
        nats.stop()


def test_creds_without_nkeys_installed_say_which_extra_to_install(tmp_path: Path) -> None:
    blocker = tmp_path / "site"
    blocker.mkdir()
    (blocker / "nkeys.py").write_text("raise ImportError('nkeys is not installed here')\n")
    creds = tmp_path / "walcar.creds"
    creds.write_text("-----BEGIN NATS USER JWT-----\nx\n------END NATS USER JWT------\n")
    document = sidecar_document("nats://127.0.0.1:1", {}, nats_creds=str(creds))
    path = tmp_path / "walcar.toml"
    path.write_text(tomli_w.dumps(document))
    env = {**os.environ, "PYTHONPATH": f"{blocker}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    result = subprocess.run([sys.executable, "-m", "sidecar.cli", "run", "--config", str(path)],
                            capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path)
    assert result.returncode != 0
    assert "pip install 'walcar[nkeys]'" in result.stderr, result.stderr
