"""What the admin endpoint and the metrics collector may see and do on a running sidecar.

The admin layer reads both sides (ingress and drain) but does not get the whole
`sidecar.app.Sidecar`: it gets this protocol, which `Sidecar` satisfies. Everything here is
read-only (properties) except the few operations admin exposes (shutdown, replays).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from sidecar.admin.dlq import DeadLetters
    from sidecar.admin.state import SidecarState
    from sidecar.admin.status import StatusPoller
    from sidecar.config import Config
    from sidecar.control.live import LiveNamespaces
    from sidecar.drain.pauses import Pauses
    from sidecar.drain.service import DrainService
    from sidecar.ingress import Ingress


class SidecarView(Protocol):
    @property
    def config(self) -> Config: ...

    @property
    def state(self) -> SidecarState: ...  # readiness reasons, the NATS connection

    @property
    def live(self) -> LiveNamespaces | None: ...  # the namespace bucket follower, when there is one

    @property
    def ingress(self) -> Ingress | None: ...  # journal and overlay counters for /metrics

    @property
    def drain(self) -> DrainService | None: ...  # partitions held here, for /metrics

    @property
    def pauses(self) -> Pauses | None: ...

    @property
    def poller(self) -> StatusPoller | None: ...

    @property
    def dead_letters(self) -> DeadLetters | None: ...

    def request_shutdown(self, reason: str = "requested") -> None: ...

    def replay_progress(self) -> list[Any]: ...

    async def start_replay(self, request: Any) -> Any: ...

    def stop_replay(self, job_id: str) -> bool: ...
