"""TLS with the operator's CA: client contexts for NATS and Cassandra, serving contexts for listeners.

Production clusters sign their certificates with a private CA (cert-manager, Vault PKI) and
often require client certificates. Every file is re-read when it changes: a rotated
cert-manager Secret reaches the next handshake (a reconnect for clients, a new connection for
servers) without a restart. A broken file fails closed at startup with an error naming it;
a half-written update later on keeps the last good context and says so in the log.
"""

from __future__ import annotations

import os
import ssl
from pathlib import Path
from typing import Any

import trio

from sidecar.logs import get_logger

log = get_logger("tls")


class TlsError(ConnectionError):
    """A TLS setting that cannot work: a missing or unreadable file, a key that does not match."""


def _stamp(*paths: str | None) -> tuple[tuple[int, int], ...]:
    stamps = []
    for path in paths:
        if path:
            info = os.stat(path)
            stamps.append((info.st_mtime_ns, info.st_size))
    return tuple(stamps)


def _check_file(what: str, path: str) -> str:
    resolved = Path(path).expanduser()
    if not resolved.is_file():
        raise TlsError(f"{what}: {path}: no such file")
    if not os.access(resolved, os.R_OK):
        raise TlsError(f"{what}: {path}: not readable")
    return str(resolved)


def client_context(where: str, ca_file: str | None, cert_file: str | None, key_file: str | None,
                   check_hostname: bool = True) -> ssl.SSLContext:
    """A client context trusting `ca_file` (else the system roots), presenting `cert_file` if set.

    `where` names the setting in errors (`sidecar.nats_tls`)."""
    context = ssl.create_default_context()
    context.check_hostname = check_hostname
    if ca_file:
        path = _check_file(f"{where}.ca_file", ca_file)
        try:
            context = ssl.create_default_context(cafile=path)
            context.check_hostname = check_hostname
        except (ssl.SSLError, ValueError) as exc:
            raise TlsError(f"{where}.ca_file: {ca_file}: not a PEM CA certificate ({exc})") from None
    if cert_file:
        cert = _check_file(f"{where}.cert_file", cert_file)
        key = _check_file(f"{where}.key_file", key_file) if key_file else None
        try:
            context.load_cert_chain(cert, key)
        except ssl.SSLError as exc:
            raise TlsError(f"{where}: cannot use cert_file {cert_file} with key_file {key_file or '(in cert_file)'}: "
                           f"{exc.reason or exc} (not PEM, or the key does not match the certificate)") from None
    elif key_file:
        raise TlsError(f"{where}.key_file is set without cert_file")
    return context


class ClientTls:
    """A client context rebuilt when its files change; ask for `context()` at each (re)connect."""

    def __init__(self, where: str, ca_file: str | None = None, cert_file: str | None = None,
                 key_file: str | None = None, *, check_hostname: bool = True, server_name: str | None = None,
                 handshake_first: bool = False) -> None:
        self.where = where
        self.files = (ca_file, cert_file, key_file)
        self.check_hostname = check_hostname
        self.server_name = server_name
        self.handshake_first = handshake_first
        self._context = client_context(where, *self.files, check_hostname=check_hostname)  # fails closed
        self._seen = self._stamp()

    @classmethod
    def from_settings(cls, where: str, settings: Any) -> ClientTls | None:
        """From a config struct with ca_file/cert_file/key_file (and maybe the others); None for None."""
        if settings is None:
            return None
        return cls(where, settings.ca_file, settings.cert_file, settings.key_file,
                   check_hostname=getattr(settings, "check_hostname", True),
                   server_name=getattr(settings, "server_name", None),
                   handshake_first=getattr(settings, "handshake_first", False))

    def _stamp(self) -> tuple[tuple[int, int], ...] | None:
        try:
            return _stamp(*self.files)
        except OSError:
            return None

    def context(self) -> ssl.SSLContext:
        stamp = self._stamp()
        if stamp is not None and stamp != self._seen:
            try:
                self._context = client_context(self.where, *self.files, check_hostname=self.check_hostname)
                self._seen = stamp
                log.info("tls_files_reloaded", setting=self.where)
            except TlsError as exc:  # half-written: the next connect looks again
                log.warning("tls_reload_failed", setting=self.where, error=str(exc))
        return self._context


def explain(exc: BaseException, where: str) -> str:
    """An SSL failure in words an operator can act on, naming the setting to look at."""
    cause: BaseException | None = exc
    while cause is not None and not isinstance(cause, ssl.SSLError):
        cause = cause.__cause__  # trio wraps it in BrokenResourceError
    exc = cause or exc
    if isinstance(exc, ssl.SSLCertVerificationError):
        message = exc.verify_message or str(exc)
        hint = ""
        if "local issuer" in message or "self-signed" in message or "self signed" in message:
            hint = f": is {where}.ca_file the CA that signed the server's certificate?"
        elif "expired" in message:
            hint = ": the server's certificate has expired"
        elif "not yet valid" in message:
            hint = ": the server's certificate is not valid yet (clock skew?)"
        elif "Hostname mismatch" in message or "IP address mismatch" in message:
            hint = f": set {where}.server_name to a name the certificate carries"
        return f"TLS: the server's certificate failed verification ({message}){hint}"
    if isinstance(exc, ssl.SSLError):
        reason = (exc.reason or str(exc)).upper()
        if "CERTIFICATE_REQUIRED" in reason or "HANDSHAKE_FAILURE" in reason:
            return (f"TLS: the server requires a client certificate ({exc.reason}): "
                    f"set {where}.cert_file and {where}.key_file")
        if "CERTIFICATE_EXPIRED" in reason:
            return f"TLS: the server refused our client certificate: it has expired ({exc.reason})"
        if any(word in reason for word in ("BAD_CERTIFICATE", "UNKNOWN_CA", "CERTIFICATE_UNKNOWN",
                                             "UNSUPPORTED_CERTIFICATE")):
            return (f"TLS: the server refused our client certificate ({exc.reason}): is {where}.cert_file "
                    f"signed by a CA the server trusts, and still valid?")
        return f"TLS: {exc.reason or exc}"
    return f"{type(exc).__name__}: {exc}"


async def reload_certificate(context: ssl.SSLContext, certfile: str, keyfile: str, interval: float,
                             where: str = "certificate") -> None:
    """New handshakes use the new certificate; a half-updated pair is skipped and retried at the next tick."""
    seen = _stamp(certfile, keyfile)
    while True:
        await trio.sleep(interval)
        try:
            stamp = _stamp(certfile, keyfile)
            if stamp == seen:
                continue
            # check the pair on a scratch context first: a mismatched half-update must not reach the live one
            ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(certfile, keyfile)
            context.load_cert_chain(certfile, keyfile)
        except (OSError, ssl.SSLError) as exc:
            log.warning("certificate_reload_failed", error=str(exc), cert_file=certfile, setting=where)
            continue
        seen = stamp
        log.info("certificate_reloaded", cert_file=certfile, setting=where)
