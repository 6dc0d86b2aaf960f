"""A virtiofsd process, started by us or adopted from an earlier daemon: start, watch, stop.

* It is started with ``os.posix_spawn`` in a session of its own, not with ``subprocess.Popen``:
  a Popen object owns the reaping, warns when dropped while its child lives and hands it to a
  module-level list that reaps it later, but leaving live children behind is exactly what daemon
  shutdown does here. A bare pid plus a pidfd is one model for a process we started and for one we
  adopt: the pidfd becomes readable when the process exits, whether or not it is our child.
* Its own session (and so process group) lets us signal everything it forks (the legacy
  virtiofsd's namespace sandbox runs its worker as a child), and keeps it out of the daemon's
  group, so a daemon exit does not take it down; no PR_SET_PDEATHSIG for the same reason.
* A process is known by pid **and** start time (/proc/<pid>/stat field 22): a pid alone may name
  a stranger once a process that is not our child has been reaped by init.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Sequence
from dataclasses import dataclass

from .backends_virtiofsd import LISTENER_FD
from .logs import kv

log = logging.getLogger("watcher.backends")

_SYSTEMD_ENV = ("NOTIFY_SOCKET", "WATCHDOG_PID", "WATCHDOG_USEC", "LISTEN_FDS", "LISTEN_PID")
"""The daemon's systemd hand-offs: a child must not be able to notify systemd on its behalf."""


def start_ticks(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (/proc/<pid>/stat field 22), or None.

    The command name (field 2) may hold spaces and parentheses, so fields are counted from the
    last ')'.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as file:
            text = file.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = text[text.rindex(b")") + 2 :].split()
    return int(fields[22 - 3])


@dataclass(frozen=True)
class ExitStatus:
    """How a virtiofsd ended; code and signal are both None when it was not our child."""

    code: int | None = None
    signal: int | None = None

    @property
    def clean(self) -> bool:
        """rc 0 is virtiofsd's "Client disconnected, shutting down" (virtiofsd.md §2)."""
        return self.code == 0

    def __str__(self) -> str:
        if self.signal is not None:
            with contextlib.suppress(ValueError):
                return f"killed by {signal.Signals(self.signal).name}"
            return f"killed by signal {self.signal}"
        if self.code is not None:
            return f"rc {self.code}"
        return "ended, status unknown (not our child)"


class BackendProcess:
    """A running virtiofsd, known by pid, start time and pidfd; started by us or adopted."""

    def __init__(self, pid: int, pidfd: int, ticks: int) -> None:
        self.pid = pid
        self.ticks = ticks
        self._pidfd = pidfd
        self.exited = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(pidfd, self._on_exit)

    def _on_exit(self) -> None:
        self._loop.remove_reader(self._pidfd)
        self.exited.set()

    @classmethod
    def spawn(cls, argv: Sequence[str], listener: int, output: int) -> BackendProcess:
        """Start ``argv`` in a new session, ``listener`` as fd 3, ``output`` as stdout and stderr.

        Only those reach it: descriptors the daemon itself inherited without close-on-exec are
        closed, as ``subprocess`` would. SIGPIPE and SIGXFSZ go back to their defaults because
        Python ignores them and exec keeps an ignored signal ignored.
        """
        # The daemon's stdio is open (systemd connects it), so both descriptors are >= 3 and the
        # dup2s cannot overwrite each other's source; dup2(fd, fd) clears FD_CLOEXEC (glibc >=
        # 2.29), so a listener that happens to be fd 3 is inherited too.
        actions: list[tuple[int, ...] | tuple[int, int, str, int, int]] = [
            (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
            (os.POSIX_SPAWN_DUP2, output, 1),
            (os.POSIX_SPAWN_DUP2, output, 2),
            (os.POSIX_SPAWN_DUP2, listener, LISTENER_FD),
        ]
        actions += [(os.POSIX_SPAWN_CLOSE, fd) for fd in _inheritable_fds() if fd > LISTENER_FD]
        env = {k: v for k, v in os.environ.items() if k not in _SYSTEMD_ENV}
        pid = os.posix_spawn(
            argv[0],
            list(argv),
            env,
            file_actions=actions,
            setsid=True,
            setsigdef=(signal.SIGPIPE, signal.SIGXFSZ),
            setsigmask=(),
        )
        # Our child cannot be reaped (and its pid reused) before we wait for it: both are safe.
        ticks = start_ticks(pid)
        assert ticks is not None
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            os.killpg(pid, signal.SIGKILL)  # unwatched, it would be a runaway
            raise
        return cls(pid, pidfd, ticks)

    @classmethod
    def adopt(cls, pid: int, ticks: int) -> BackendProcess | None:
        """The process a registry names, if it still runs; None if it is gone or its pid reused.

        The pidfd is opened first and the start time checked after: a match then proves the pidfd
        names the recorded process, since its pid could not have been reused while it lived.
        """
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            return None
        if start_ticks(pid) != ticks:
            os.close(pidfd)
            return None
        return cls(pid, pidfd, ticks)

    def signal_group(self, sig: int) -> None:
        """Signal the process and everything it forked, unless it has already ended.

        The start time is checked again first: a process started by an earlier daemon is not our
        child, and once its parent (init) reaps it, its pid and group id may name a stranger.
        """
        if self.exited.is_set() or start_ticks(self.pid) != self.ticks:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, sig)

    def reap(self) -> ExitStatus:
        """Collect the exit status after ``exited``; unknown for a process we did not start.

        Before reaping our own child, whatever is left of its process group gets SIGKILL: the
        sandbox child of a virtiofsd normally dies with its monitor (PR_SET_PDEATHSIG, virtiofsd.md
        §2), and one that did not would be a second virtiofsd on the listener. The unreaped leader
        still holds the group id, so the signal cannot reach a stranger.
        """
        try:
            peek = os.waitid(os.P_PIDFD, self._pidfd, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return ExitStatus()
        if peek is None:
            return ExitStatus()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL)
        result = os.waitid(os.P_PIDFD, self._pidfd, os.WEXITED | os.WNOHANG)
        if result is None:
            return ExitStatus()
        if result.si_code == os.CLD_EXITED:
            return ExitStatus(code=result.si_status)
        return ExitStatus(signal=result.si_status)

    async def wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the exit; True if it happened."""
        try:
            async with asyncio.timeout(timeout):
                await self.exited.wait()
        except TimeoutError:
            return False
        return True

    def close(self) -> None:
        """Stop watching; the process itself is left alone."""
        if not self.exited.is_set():
            self._loop.remove_reader(self._pidfd)
        os.close(self._pidfd)


def _inheritable_fds() -> list[int]:
    """Descriptors the daemon itself inherited without close-on-exec: not for virtiofsd."""
    found = []
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # the listing's own descriptor is already closed
            if os.get_inheritable(int(name)):
                found.append(int(name))
    return found


async def terminate(process: BackendProcess, timeout: float, **ids: str) -> ExitStatus:
    """SIGTERM, then SIGKILL after ``timeout``: the legacy virtiofsd can miss SIGTERM while it
    waits in accept() (observed, tests/test_vhost_user.py)."""
    process.signal_group(signal.SIGTERM)
    if not await process.wait(timeout):
        log.warning(kv("virtiofsd ignored SIGTERM, killing it", **ids, pid=process.pid))
        process.signal_group(signal.SIGKILL)
        if not await process.wait(timeout):
            log.error(kv("virtiofsd survived SIGKILL", **ids, pid=process.pid))
    status = process.reap()
    process.close()
    log.info(kv("virtiofsd stopped", **ids, pid=process.pid, exit=str(status)))
    return status
