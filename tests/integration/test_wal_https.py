"""Two walcars: region B serves its KV listener over HTTPS, region A replicates to it through a `wal` target
that trusts the operator's CA (and sends the region token). Both sides re-read rotated files."""

from __future__ import annotations

import socket
import ssl
from pathlib import Path

import httpx
import pytest
import trio

from sidecar.config import stream_name
from tests.support.pki import issue, make_ca
from tests.support.procs import NatsProcess, free_port, wait_for
from tests.support.sidecar import SidecarProcess, kv_listener, sidecar_document
from tests.support.streams import read_stream

TOKEN = "region-token-8c1d"


async def test_a_replicates_to_b_over_https_and_both_pick_up_a_rotated_pki(
        private_nats: NatsProcess, services, tmp_path: Path, unique: str) -> None:
    first, second = make_ca("region-ca-1"), make_ca("region-ca-2")
    (tmp_path / "token").write_text(TOKEN)
    served = issue(first, tmp_path / "b.pem", tmp_path / "b-key.pem", common_name="walcar-b")
    b_port = free_port()
    b = SidecarProcess(sidecar_document(
        private_nats.url, {unique: {"partitions": 2}},
        [{"protocol": "kv", "bind": f"127.0.0.1:{b_port}",
          "tls": {"cert_file": str(served.cert), "key_file": str(served.key), "reload_interval": "100ms"}}],
        region="b", region_token_file=str(tmp_path / "token")), tmp_path / "b").start()
    trusted = first.write(tmp_path / "a-trusts.pem")
    offering_h2 = ssl.create_default_context(cafile=str(trusted))
    offering_h2.set_alpn_protocols(["h2", "http/1.1"])  # as Go's net/http, curl and httpx[http2] do
    with socket.create_connection(("127.0.0.1", b_port), timeout=10) as raw, \
            offering_h2.wrap_socket(raw, server_hostname="localhost") as tls:
        assert tls.selected_alpn_protocol() == "http/1.1"  # the KV server speaks HTTP/1.1 only
        tls.sendall(b"GET /healthz HTTP/1.1\r\nhost: localhost\r\n\r\n")
        assert tls.recv(4096).startswith(b"HTTP/1.1 200 ")
    a_kv = kv_listener()
    a = SidecarProcess(sidecar_document(
        services.nats_url,
        {unique: {"partitions": 2, "retry": {"initial_delay": "50ms", "max_delay": "500ms"},
                  "targets": [{"name": "peer", "type": "wal", "url": f"https://localhost:{b_port}",
                               "token_file": str(tmp_path / "token"), "timeout": "2s",
                               "tls": {"ca_file": str(trusted)}}]}},
        [a_kv], region="a", drain={"lease_ttl": "2s"}), tmp_path / "a").start()
    try:
        async with httpx.AsyncClient(base_url=f"http://{a_kv['bind']}", timeout=10) as client:

            async def write(first_key: int) -> None:
                for i in range(first_key, first_key + 5):
                    put = await client.put(f"/v1/kv/{unique}/k{i}", json={"items": [{"key": "v", "text": str(i)}]})
                    assert put.status_code == 200 and put.json()["durable"] == "true", put.text

            async def in_b() -> int:
                return len(await read_stream(private_nats.url, stream_name(unique)))

            await write(0)
            count = 0

            async def arrived(n: int) -> None:
                nonlocal count
                for _ in range(150):
                    count = await in_b()
                    if count >= n:
                        return
                    await trio.sleep(0.2)
                raise AssertionError(f"{count} of {n} entries reached region B\n{a.log()[-3000:]}")

            await arrived(5)

            # cert-manager rotates B's serving certificate to a new CA; A's CA bundle is updated to match
            issue(second, served.cert, served.key, common_name="walcar-b")
            new_trust = ssl.create_default_context(cafile=str(second.write(tmp_path / "ca2.pem")))

            def b_serves_the_new_certificate() -> bool:
                try:
                    return httpx.get(f"https://localhost:{b_port}/healthz", verify=new_trust, timeout=2).is_success
                except httpx.HTTPError:
                    return False

            wait_for(b_serves_the_new_certificate, 10, what="B to serve the rotated certificate")
            second.write(trusted)
            await write(5)
            await arrived(10)
            assert count == 10
    finally:
        a.stop()
        b.stop()
    assert TOKEN not in a.log() and TOKEN not in b.log()


def test_a_listener_pair_that_does_not_load_stops_walcar_naming_it(tmp_path: Path, services) -> None:
    pair = issue(make_ca(), tmp_path / "c.pem", tmp_path / "k.pem")
    other = issue(make_ca(), tmp_path / "c2.pem", tmp_path / "k2.pem")
    listener = {**kv_listener(), "tls": {"cert_file": str(pair.cert), "key_file": str(other.key)}}
    walcar = SidecarProcess(sidecar_document(services.nats_url, {}, [listener]), tmp_path / "w")
    with pytest.raises(RuntimeError, match="cannot serve with cert_file"):
        walcar.start(timeout=30)

