"""CH's vhost-user connect loop, as the double runs it against real backend sockets.

CH is the vhost-user client of every virtiofsd (cloud-hypervisor-api.md §7). On hot add, on
every boot and reboot, and after a backend dies, it connects to the device's socket path and
retries every 100 ms for up to 60 s; on add, boot and reboot it does so in the single VMM thread,
which is why a missing virtiofsd stalls the whole API. Which errors are retried, and how running
out of time reads, depends on the release (§0, §3), so both come from the profile.

The double does a real connect and the real handshake (`watcher.testing.vhost_user`), so a
virtiofsd, fake or real, sees exactly what CH would do to it: one connection, kept until the VM
stops, reboots or ejects the device.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from watcher.testing.chdouble_profiles import Profile
from watcher.testing.vhost_user import VhostUserError, VhostUserFrontend, connect_frontend

# What a backend that hangs up during the handshake gives: CH's `VhostUserGetFeatures` around
# the vhost crate's message for a short read. The vhost crate's wording is not pinned down in
# the reference, so this tail is the double's best reading, not a quotation.
HANDSHAKE_LOST = ["Get features failed", "vhost-user: partial message"]

AttemptHook = Callable[[str, OSError | None], None]


class BackendFailure(Exception):
    """The backend could not be connected; `tail` follows "Cannot create virtio-fs device"."""

    def __init__(self, tail: list[str]) -> None:
        super().__init__(": ".join(tail))
        self.tail = tail


async def connect_backend(
    path: str,
    profile: Profile,
    *,
    window: float,
    interval: float,
    on_attempt: AttemptHook,
) -> VhostUserFrontend:
    """Connect and handshake like `connect_vhost_user(server=false)`: retry within `window`.

    The first attempt is immediate; the window is checked after each failed attempt, as CH
    does, so the last attempt happens at or just after `window`. `on_attempt` sees every
    connect result (None for success) so tests can wait for "the double tried and failed".
    """
    loop = asyncio.get_running_loop()
    start = loop.time()
    while True:
        try:
            frontend = await connect_frontend(path)
        except OSError as error:
            on_attempt(path, error)
            if not profile.retries(error):
                raise BackendFailure(profile.connect_failure(error, window_over=False)) from None
            if loop.time() - start >= window:
                raise BackendFailure(profile.connect_failure(error, window_over=True)) from None
        else:
            try:
                await frontend.handshake()
            except VhostUserError:
                frontend.close()
                on_attempt(path, ConnectionResetError())
                if not profile.retries_lost_handshake or loop.time() - start >= window:
                    raise BackendFailure(HANDSHAKE_LOST) from None
            else:
                on_attempt(path, None)
                return frontend
        await asyncio.sleep(interval)
