"""What the daemon knows about each VM and share, in a shape that can be shown.

The reconciler owns these records and updates them as it learns; `once`
prints them, and the status file is a JSON rendering of them. Times are wall
clock (`time.time()`) because they are shown to people; scheduling uses the
loop's monotonic clock elsewhere.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from .backends_share import BackendStatus


class SocketState(enum.Enum):
    ABSENT = "absent"
    CHECKING = "checking"
    """The API socket exists and CH has not answered yet."""
    STALE = "stale"
    """The file exists but nothing listens: CH crashed or exited with an error (§6)."""
    LIVE = "live"
    NOT_CH = "not-ch"
    """Something answers, but not Cloud Hypervisor (e.g. a Firecracker socket)."""
    UNREACHABLE = "unreachable"
    """CH did not answer in time or the connection failed; retrying."""


class ShareState(enum.Enum):
    PENDING = "pending"
    ATTACHED = "attached"
    WAITING_BACKEND = "waiting-backend"
    WAITING_EJECT = "waiting-eject"
    RETRYING = "retrying"
    FAILED = "failed"


@dataclass
class ShareStatus:
    tag: str
    device_id: str
    state: ShareState = ShareState.PENDING
    since: float = 0.0
    detail: str = ""
    """Why the share is in this state: CH's reason, what is awaited."""
    fix: str = ""
    """For FAILED: what a human must change to unblock it."""
    attempt: int = 0
    next_try_at: float | None = None
    backend: BackendStatus | None = None
    """For a managed share, its virtiofsd as the supervisor last reported it; None otherwise.
    Filled in by the daemon whenever it hands out statuses, not kept up to date here."""


@dataclass
class VmStatus:
    name: str
    api_socket: str
    socket: SocketState = SocketState.ABSENT
    ch_version: str | None = None
    ch_pid: int | None = None
    vm_state: str | None = None
    detail: str = ""
    shares: dict[str, ShareStatus] = field(default_factory=dict)
    unmanaged: list[str] = field(default_factory=list)
    """Devices with our id prefix that the config no longer lists (prune is off)."""

    def all_attached(self) -> bool:
        return all(share.state is ShareState.ATTACHED for share in self.shares.values())
