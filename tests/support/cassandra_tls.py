"""A TLS-only Cassandra node of a test module's own: client_encryption_options with PEM files.

One node per module (about a minute and 1 GiB to start), its certificates made by the test.
`require_client_auth` decides whether clients must present a certificate the CA signed.
"""

from __future__ import annotations

import ssl
from pathlib import Path

from tests.support.pki import Authority, issue
from tests.support.procs import CassandraProcess, services_module


def tls_cassandra(workdir: Path, ca: Authority, *, require_client_auth: bool) -> CassandraProcess:
    """Not started; its readiness probe speaks TLS (with a client certificate when one is required)."""
    workdir.mkdir(parents=True, exist_ok=True)
    node = issue(ca, workdir / "node.pem", workdir / "node-key.pem", common_name="cassandra.test", rsa=True)
    keystore = workdir / "keystore.pem"
    keystore.write_bytes(node.key.read_bytes() + node.cert.read_bytes())
    truststore = ca.write(workdir / "truststore.pem")
    probe = ssl.create_default_context(cafile=str(truststore))
    if require_client_auth:
        client = issue(ca, workdir / "probe.pem", workdir / "probe-key.pem", common_name="probe", client=True)
        probe.load_cert_chain(str(client.cert), str(client.key))
    extra = services_module().client_encryption_yaml(keystore, truststore, require_client_auth)
    return CassandraProcess(workdir / "node", extra_yaml=extra, ready_context=probe)
