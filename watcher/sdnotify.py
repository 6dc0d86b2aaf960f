"""The sd_notify protocol, spoken directly: one datagram of `KEY=value` lines.

Why no library: the Python packages for it are unmaintained, need libsystemd
to build, or lack Python 3.11 wheels, and the protocol is one `sendto` on an
AF_UNIX datagram socket (python-stack.md §6).

Three facts shape this module:

* The send is non-blocking (`MSG_DONTWAIT`). The daemon calls it from the
  event loop; if systemd's receive queue is full, losing a STATUS line is
  better than stalling every VM's reconcile behind it.
* A vanished or refused socket is not an error worth raising: the daemon may
  outlive the manager's socket (systemd re-exec, a test harness that went
  away), and readiness is a courtesy to systemd, not part of the daemon's
  job. The first failure per address is logged at debug, then it stays quiet.
* Under `Type=notify-reload`, `RELOADING=1` without `MONOTONIC_USEC=` leaves
  `systemctl reload` waiting for minutes and then failing (python-stack.md
  §6, trapperkeeper PR #110), so `reloading()` always sends both.

The watchdog ping is sent by a task on the daemon's own event loop, not a
thread: a thread would keep pinging while the loop is wedged, and catching a
wedged loop is the whole point of `WatchdogSec=`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time

from .logs import kv

log = logging.getLogger("watcher.sdnotify")

_reported_addresses: set[str] = set()
"""Addresses whose send failure was already logged; keeps a dead socket to one log line."""


def notify(*fields: str) -> bool:
    """Send `fields` (each `KEY=value`) to `$NOTIFY_SOCKET` as one datagram.

    True when the datagram was handed to the kernel; False when not under a
    notify-capable manager or when the socket cannot take it. Never raises
    for socket trouble. A field containing a newline would smuggle in an
    extra assignment, so that is refused as a programming error.
    """
    for field in fields:
        if "\n" in field or "=" not in field:
            raise ValueError(f"sd_notify field must be one KEY=value line: {field!r}")
    address = os.environ.get("NOTIFY_SOCKET", "")
    if address.startswith("@"):
        target = "\0" + address[1:]  # Linux abstract namespace
    elif address.startswith("/"):
        target = address
    else:
        # Unset: not started by systemd. "vsock:..." is for managers outside a VM.
        if address:
            _report_once(address, "unsupported NOTIFY_SOCKET address")
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto("\n".join(fields).encode(), socket.MSG_DONTWAIT, target)
    except OSError as err:
        _report_once(address, f"{err.strerror or err}")
        return False
    return True


def _report_once(address: str, reason: str) -> None:
    if address not in _reported_addresses:
        _reported_addresses.add(address)
        log.debug(kv("sd_notify failed", socket=address, reason=reason, repeats="not logged"))


def _one_line(text: str) -> str:
    """STATUS text may quote CH's error messages, which can span lines."""
    return " ".join(text.splitlines())


def ready(status: str) -> bool:
    """Start-up or reload finished; `status` is what `systemctl status` shows."""
    return notify("READY=1", f"STATUS={_one_line(status)}")


def monotonic_usec() -> int:
    """CLOCK_MONOTONIC in µs, the clock systemd compares MONOTONIC_USEC against."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def reloading() -> bool:
    """A reload began; `ready()` must follow when it is done (success or not)."""
    return notify("RELOADING=1", f"MONOTONIC_USEC={monotonic_usec()}")


def stopping() -> bool:
    """Shutdown began, so systemd shows `deactivating` instead of a hung `active`."""
    return notify("STOPPING=1")


def status(text: str) -> bool:
    """Update the free-form status line without changing the service state."""
    return notify(f"STATUS={_one_line(text)}")


def watchdog_interval() -> float | None:
    """Seconds between WATCHDOG=1 pings, or None when systemd expects none from us.

    Half of `WATCHDOG_USEC`, as sd_watchdog_enabled(3) advises. The variables
    are inherited by every child the daemon starts, so `WATCHDOG_PID`, when
    set, names the one process systemd is watching; anyone else stays silent.
    """
    try:
        usec = int(os.environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    pid = os.environ.get("WATCHDOG_PID")
    if pid is not None:
        try:
            if int(pid) != os.getpid():
                return None
        except ValueError:
            return None
    return usec / 2 / 1_000_000


async def watchdog_loop(interval: float) -> None:
    """Ping the watchdog every `interval` seconds until cancelled.

    Run it as a task on the daemon's loop: if a callback blocks the loop for
    longer than `WatchdogSec=`, the pings stop and systemd kills and restarts
    the daemon (Restart=on-failure counts a watchdog timeout as a failure).
    """
    while True:
        notify("WATCHDOG=1")
        await asyncio.sleep(interval)
