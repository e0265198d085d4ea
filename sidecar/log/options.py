"""How to reach NATS: URL, TLS and credentials, read once from the config for both connections.

The trio link and nats-py get the same servers, the same CA and client certificate and the
same credentials. Secrets live in files (a mounted Secret) and never reach a log line:
`redact_urls` (sidecar.secrets) is what logs and errors show of a URL.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sidecar.config import SidecarSettings
from sidecar.secrets import redact_urls
from sidecar.tls import ClientTls


class CredentialsError(ConnectionError):
    """A credentials file that cannot be used; the message names the setting and the file."""


def read_secret_file(setting: str, path: str) -> str:
    try:
        value = Path(path).expanduser().read_text().strip()
    except OSError as exc:
        raise CredentialsError(f"sidecar.{setting}: {path}: {exc.strerror or exc}") from None
    if not value:
        raise CredentialsError(f"sidecar.{setting}: {path} is empty")
    return value


def require_nkeys() -> None:
    """Signing with a creds file's seed needs `nkeys` (the `walcar[nkeys]` extra), in both clients."""
    try:
        import nkeys  # noqa: F401
    except ImportError:
        raise CredentialsError("sidecar.nats_creds needs the `nkeys` package: pip install 'walcar[nkeys]'") from None


@dataclass(frozen=True)
class NatsOptions:
    url: str
    creds: str | None = None
    tls: ClientTls | None = None
    user: str | None = None
    password: str | None = None
    token: str | None = None
    max_pending: int = 32 * 1024 * 1024

    @classmethod
    def from_settings(cls, settings: SidecarSettings) -> NatsOptions:
        """Reads the secret files and the TLS files now: a bad one is a startup error naming it."""
        if settings.nats_creds:
            if not Path(settings.nats_creds).expanduser().is_file():
                raise CredentialsError(f"sidecar.nats_creds: {settings.nats_creds}: no such file")
            require_nkeys()
        return cls(
            url=settings.nats_url,
            creds=str(Path(settings.nats_creds).expanduser()) if settings.nats_creds else None,
            tls=ClientTls.from_settings("sidecar.nats_tls", settings.nats_tls),
            user=settings.nats_user,
            password=read_secret_file("nats_password_file", settings.nats_password_file)
            if settings.nats_password_file else None,
            token=read_secret_file("nats_token_file", settings.nats_token_file) if settings.nats_token_file else None,
            max_pending=int(settings.nats_max_pending),
        )

    @property
    def safe_url(self) -> str:
        return redact_urls(self.url)
