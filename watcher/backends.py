"""Run and re-run virtiofsd for managed shares, on sockets the daemon owns.

Why a supervisor: virtiofsd serves exactly ONE vhost-user connection and exits with rc 0 when its
frontend disconnects, and Cloud Hypervisor disconnects at every guest reboot or shutdown, then
reconnects to the same socket path, retrying for 60 s (virtiofsd.md §2, cloud-hypervisor-api.md
§6-§7). So a virtiofsd lasts one VM boot, and the next one has to be waiting before CH's retries
run out. libvirt, Kata, Incus and Proxmox all solve it the same way (virtiofsd.md §3), and so do
we: the daemon binds and owns the listening socket, and starts each virtiofsd with ``--fd=3`` on
it. A CH connect that arrives while no virtiofsd runs waits in the listen backlog and is served by
the next one (observed, virtiofsd.md §2). Consequences:

* rc 0 means "its VM went away": the next virtiofsd starts at once, so one is waiting before CH
  reconnects. Any other end soon after start is a crash loop (a missing shared_dir, bad
  extra_args): restarts back off exponentially, and the reason (virtiofsd's last output line) is
  logged once through a FailureThrottle, not at every attempt; a repeated attempt's identical
  output lines go to debug.
* The next virtiofsd starts only after the previous one has exited (and the rest of its process
  group is gone), so two never wait on one listener. The socket is never probed by connecting:
  the probe would become a virtiofsd's one frontend (virtiofsd.md §2).

Why children outlive the daemon: a daemon restart (upgrade, crash) must not cut a VM's live
connection, and must not leave runaways either.

* Each virtiofsd runs in its own session without PR_SET_PDEATHSIG, so a daemon exit or crash does
  not kill it. ``close()`` (daemon stop) kills and unlinks nothing: a virtiofsd waiting in accept()
  still holds the listener, so a VM that connects while the daemon is down is still served.
* ``<runtime_dir>/<vm>/<tag>.json`` records the virtiofsd's pid and start time. ``ensure()`` in
  the next daemon adopts a live process with the same start time (a pid alone may have been
  reused): it does not unlink or rebind while that process lives, and watches it with a pidfd,
  which works for a process that is not our child. When it exits, a fresh listener is bound and
  the normal loop goes on; the gap is milliseconds and CH retries for 60 s.
* virtiofsd's stdout and stderr go to the FIFO ``<runtime_dir>/<vm>/<tag>.log``, which the daemon
  reads line by line into its own log. An adopting daemon reopens it and drains what was written
  meanwhile; a virtiofsd never gets SIGPIPE while no daemon reads (``backends_process``).
* ``release()`` stops the virtiofsd: SIGTERM, then SIGKILL after a deadline, because the legacy
  virtiofsd sometimes ignores SIGTERM while it waits in accept() (tests/test_vhost_user.py).
  ``release_stale()`` does the same for registry files of shares no longer configured, which a
  daemon that was down while the configuration changed would otherwise leave running.

A socket whose virtiofsd cannot be started at all (no binary, read-only on the legacy binary) gets
no listener: a CH connect queued on a listener that no virtiofsd will ever serve would hang CH's
VMM thread with no timeout (cloud-hypervisor-api.md §7), while a missing socket makes CH give up
after 60 s with an error.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
from collections import deque
from dataclasses import dataclass, field
from typing import Literal

from .backends_process import (
    BackendProcess,
    OutputFifo,
    Registration,
    bind_listener,
    read_registration,
    registrations,
    unlink_socket,
    write_registration,
)
from .backends_virtiofsd import BackendError, Virtiofsd, find_virtiofsd, probe
from .config import BackendSettings, Share
from .logs import FailureThrottle, kv

__all__ = ["BackendError", "BackendStatus", "BackendSupervisor", "BackendTiming"]

log = logging.getLogger("watcher.backends")

BackendState = Literal["starting", "listening", "serving", "adopted", "backoff", "failed"]
"""starting: spawned, not yet accepting; listening: waiting for its frontend; serving: connected;
adopted: started by an earlier daemon, phase unknown until it logs; backoff: waiting to retry
after a failure; failed: cannot be started at all (see ``last_error``), no socket."""

_LISTENING = ("Waiting for vhost-user socket connection",)
_SERVING = ("Client connected", "Received vhost-user socket connection")
"""virtiofsd's log lines for accept() reached and returned: Rust/fake, then legacy (observed)."""


@dataclass(frozen=True)
class BackendTiming:
    """Restart backoff and stop deadline, in seconds."""

    initial_delay: float = 0.5
    max_delay: float = 30.0
    healthy_after: float = 10.0
    """A run this long was not a crash loop: the backoff starts over."""
    stop_timeout: float = 2.0
    """SIGTERM → SIGKILL deadline, and then the deadline for SIGKILL to take effect."""


@dataclass(frozen=True)
class BackendStatus:
    """What ``status`` reports for one supervised socket."""

    vm: str
    tag: str
    socket: str
    state: BackendState
    pid: int | None
    restarts: int
    last_exit: str | None
    last_error: str | None


@dataclass
class _Supervised:
    """One managed share's listener, current virtiofsd and history."""

    share: Share
    argv: list[str]
    output: OutputFifo | None = None
    listener: socket.socket | None = None
    process: BackendProcess | None = None
    started_at: float | None = None
    state: BackendState = "starting"
    runs: int = 0
    last_exit: str | None = None
    last_error: str | None = None
    run_lines: deque[str] = field(default_factory=lambda: deque(maxlen=64))
    failing: bool = False
    repeat_lines: frozenset[str] = frozenset()
    task: asyncio.Task[None] | None = None

    def status(self) -> BackendStatus:
        return BackendStatus(
            vm=self.share.vm,
            tag=self.share.tag,
            socket=self.share.socket,
            state=self.state,
            pid=None if self.process is None else self.process.pid,
            restarts=max(self.runs - 1, 0),
            last_exit=self.last_exit,
            last_error=self.last_error,
        )


class BackendSupervisor:
    """Keeps one virtiofsd waiting or serving on each managed share's socket."""

    def __init__(self, settings: BackendSettings, timing: BackendTiming | None = None) -> None:
        self._settings = settings
        self._timing = timing or BackendTiming()
        self._supervised: dict[str, _Supervised] = {}
        self._failed: dict[str, BackendStatus] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._probes: dict[str, asyncio.Task[Virtiofsd]] = {}
        self._throttle = FailureThrottle()

    def supervised(self) -> set[str]:
        """Sockets under supervision, including ones whose virtiofsd cannot be started."""
        return set(self._supervised) | set(self._failed)

    def status(self, socket: str) -> BackendStatus | None:
        entry = self._supervised.get(socket)
        return entry.status() if entry is not None else self._failed.get(socket)

    async def ensure(self, share: Share) -> None:
        """Supervise ``share``: afterwards its socket listens (or an adopted virtiofsd holds it).

        Idempotent. It does not wait for virtiofsd to be ready: CH's connect queues in the backlog.
        A changed shared_dir, readonly or cache applies from the next virtiofsd start, so a VM's
        live connection is not cut; a socket that now belongs to another VM or tag is released
        first. Raises BackendError when the share's virtiofsd cannot be started at all.
        """
        if not share.managed:
            raise ValueError(f"share {share.vm}/{share.tag} has no shared_dir: not ours to run")
        async with self._lock(share.socket):
            current = self._supervised.get(share.socket)
            if current is not None and (current.share.vm, current.share.tag) != (
                share.vm,
                share.tag,
            ):
                await self._release(current.share)
                current = None
            if current is not None and current.share == share:
                return
            try:
                argv = (await self._virtiofsd()).argv(share, self._settings.extra_args)
                if current is not None:
                    current.share, current.argv = share, argv
                    log.info(
                        kv("virtiofsd settings changed, applied at its next start", **_ids(share))
                    )
                    return
                self._supervised[share.socket] = await self._supervise(share, argv)
                self._failed.pop(share.socket, None)
            except BackendError as err:
                if current is not None:
                    current.last_error = str(err)
                else:
                    self._failed[share.socket] = BackendStatus(
                        share.vm, share.tag, share.socket, "failed", None, 0, None, str(err)
                    )
                raise

    async def release(self, share: Share) -> None:
        """Stop supervising ``share``: stop its virtiofsd, remove its socket and our files.

        Also stops a virtiofsd an earlier daemon started for it, if one still runs.
        """
        async with self._lock(share.socket):
            await self._release(share)

    async def release_stale(self, keep: set[tuple[str, str]]) -> list[str]:
        """Release every registered virtiofsd whose (vm, tag) is not in ``keep``; return sockets.

        For the daemon's start and reloads: a share removed from the configuration while the
        daemon was down still has its virtiofsd, maybe waiting in accept() forever.
        """
        released = []
        for vm, tag, record in registrations(self._settings.runtime_dir):
            if (vm, tag) in keep or record.socket in self._supervised:
                continue
            log.info(kv("releasing virtiofsd of a share no longer configured", vm=vm, tag=tag))
            await self._release_unsupervised(vm, tag, record.socket)
            released.append(record.socket)
        return released

    async def close(self) -> None:
        """Daemon shutdown: stop watching, but leave every virtiofsd running and every file.

        A virtiofsd waiting in accept() keeps its copy of the listener, so a VM that connects
        while the daemon is down is served; the next daemon adopts it through the registry.
        """
        for pending in self._probes.values():
            pending.cancel()
        entries = list(self._supervised.values())
        await self._cancel([entry.task for entry in entries if entry.task is not None])
        running = 0
        for entry in entries:
            if entry.process is not None:
                running += 1
                entry.process.close()
            self._close_files(entry)
        if running:
            log.info(kv("leaving virtiofsd running for their VMs", count=running))
        self._supervised.clear()
        self._failed.clear()

    def _lock(self, socket_path: str) -> asyncio.Lock:
        return self._locks.setdefault(socket_path, asyncio.Lock())

    async def _virtiofsd(self) -> Virtiofsd:
        """The binary and its flag style; each binary is probed once, even by concurrent callers."""
        path = find_virtiofsd(self._settings.virtiofsd)
        pending = self._probes.get(path)
        if pending is None:
            pending = self._probes[path] = asyncio.create_task(probe(path))
        try:
            return await asyncio.shield(pending)
        except BackendError:
            if self._probes.get(path) is pending:
                del self._probes[path]
            raise

    def _paths(self, vm: str, tag: str) -> tuple[str, str]:
        folder = os.path.join(self._settings.runtime_dir, vm)
        return os.path.join(folder, f"{tag}.json"), os.path.join(folder, f"{tag}.log")

    async def _supervise(self, share: Share, argv: list[str]) -> _Supervised:
        """Adopt the registered virtiofsd if it still runs, else bind the socket; start the loop."""
        registry, fifo = self._paths(share.vm, share.tag)
        try:
            os.makedirs(os.path.dirname(registry), mode=0o755, exist_ok=True)
        except OSError as err:
            raise BackendError(
                f"cannot create {os.path.dirname(registry)}: {err.strerror}"
            ) from None
        entry = _Supervised(share, argv)
        record = read_registration(registry)
        adopted = None if record is None else BackendProcess.adopt(record.pid, record.start_ticks)
        if adopted is not None and record is not None and record.socket != share.socket:
            # It listens on a socket the configuration no longer names: nothing can reach it.
            await self._stop(adopted, share.vm, share.tag)
            unlink_socket(record.socket)
            adopted = None
        try:
            entry.output = OutputFifo(fifo, lambda line: self._on_output(entry, line))
            if adopted is None:
                entry.listener = bind_listener(share.socket)
        except OSError as err:
            if adopted is not None:
                adopted.close()
            self._close_files(entry)
            raise BackendError(f"cannot listen on {share.socket}: {err.strerror}") from None
        except BackendError:
            self._close_files(entry)
            raise
        if adopted is not None:
            entry.process, entry.state, entry.runs = adopted, "adopted", 1
            log.info(
                kv("adopted virtiofsd left by the previous daemon", **_ids(share), pid=adopted.pid)
            )
        entry.task = asyncio.create_task(self._run(entry), name=f"virtiofsd {share.socket}")
        return entry

    async def _run(self, entry: _Supervised) -> None:
        try:
            await self._restart_loop(entry)
        except Exception as err:
            # A bug here must not pass silently: the share would just stop being served.
            log.exception(kv("virtiofsd supervision crashed", **_ids(entry.share)))
            entry.state, entry.last_error = "failed", repr(err)

    async def _restart_loop(self, entry: _Supervised) -> None:
        """One virtiofsd after the other, for as long as the share is supervised."""
        timing = self._timing
        loop = asyncio.get_running_loop()
        key = entry.share.socket
        backoff, delay = timing.initial_delay, 0.0
        while True:
            if entry.process is None:
                if delay > 0:
                    entry.state = "backoff"
                    await asyncio.sleep(delay)
                try:
                    self._start(entry)
                except (OSError, BackendError) as err:
                    delay, backoff = backoff, min(backoff * 2, timing.max_delay)
                    self._report_failure(entry, "could not start", str(err), delay)
                    continue
            process = entry.process
            assert process is not None
            await process.exited.wait()
            assert entry.output is not None
            entry.output.flush()
            status = process.reap()
            process.close()
            entry.process, entry.last_exit = None, str(status)
            ran = None if entry.started_at is None else loop.time() - entry.started_at
            if status.clean or (status.code is None and status.signal is None):
                # Its VM disconnected (reboot, shutdown, CH exit), or it was adopted and is not our
                # child, so its status is unknown: it had been serving. CH reconnects within
                # seconds, so the next one starts at once.
                backoff, delay = timing.initial_delay, 0.0
                entry.failing, entry.repeat_lines = False, frozenset()
                self._throttle.clear(key)
                log.info(
                    kv("virtiofsd exited, starting the next", **_ids(entry.share), pid=process.pid)
                )
                continue
            if ran is None or ran >= timing.healthy_after:
                backoff = timing.initial_delay
            delay, backoff = backoff, min(backoff * 2, timing.max_delay)
            entry.repeat_lines = frozenset(entry.run_lines)
            reason = entry.run_lines[-1] if entry.run_lines else "no output"
            self._report_failure(entry, str(status), reason, delay)

    def _start(self, entry: _Supervised) -> None:
        share = entry.share
        registry, fifo = self._paths(share.vm, share.tag)
        if entry.listener is None:
            entry.listener = bind_listener(share.socket)
        entry.run_lines.clear()
        process = BackendProcess.spawn(entry.argv, entry.listener, fifo)
        entry.process, entry.state, entry.runs = process, "starting", entry.runs + 1
        entry.started_at = asyncio.get_running_loop().time()
        # In a crash loop each attempt is news only at debug level; the failure is logged once.
        log.log(
            logging.DEBUG if entry.failing else logging.INFO,
            kv("virtiofsd started", **_ids(share), pid=process.pid, run=entry.runs),
        )
        try:
            write_registration(
                registry, Registration(process.pid, process.ticks, share.socket, tuple(entry.argv))
            )
        except OSError as err:
            # It runs and serves all the same; only a daemon restart would not find it.
            log.warning(kv("cannot write registry file", path=registry, error=err.strerror))

    def _report_failure(self, entry: _Supervised, how: str, reason: str, delay: float) -> None:
        entry.failing, entry.last_error = True, reason
        loop = asyncio.get_running_loop()
        held_back = self._throttle.admit(entry.share.socket, f"{how}: {reason}", loop.time())
        if held_back is not None:
            log.error(
                kv(
                    "virtiofsd failed",
                    **_ids(entry.share),
                    exit=how,
                    reason=reason,
                    retry_in=f"{delay:g}s",
                    repeats=held_back or None,
                )
            )

    def _on_output(self, entry: _Supervised, line: str) -> None:
        """One line of virtiofsd's output into the daemon's log, and into the share's state."""
        if not line:
            return
        entry.run_lines.append(line)
        if any(marker in line for marker in _LISTENING):
            entry.state = "listening"
        elif any(marker in line for marker in _SERVING):
            entry.state = "serving"
        level = logging.ERROR if "ERROR" in line else logging.INFO
        if line in entry.repeat_lines:
            level = logging.DEBUG
        pid = None if entry.process is None else entry.process.pid
        log.log(level, kv("virtiofsd", **_ids(entry.share), pid=pid, out=line))

    async def _release(self, share: Share) -> None:
        self._failed.pop(share.socket, None)
        entry = self._supervised.pop(share.socket, None)
        if entry is None:
            await self._release_unsupervised(share.vm, share.tag, share.socket)
            return
        if entry.task is not None:
            await self._cancel([entry.task])
        if entry.process is not None:
            await self._stop(entry.process, share.vm, share.tag)
        self._close_files(entry)
        self._remove_files(share.vm, share.tag, share.socket)
        log.info(kv("virtiofsd released", **_ids(share)))

    async def _release_unsupervised(self, vm: str, tag: str, socket_path: str) -> None:
        """Stop the virtiofsd a registry names, if it still runs, and remove the share's files."""
        registry, _ = self._paths(vm, tag)
        record = read_registration(registry)
        process = None if record is None else BackendProcess.adopt(record.pid, record.start_ticks)
        if process is not None:
            await self._stop(process, vm, tag)
        self._remove_files(vm, tag, socket_path)

    async def _stop(self, process: BackendProcess, vm: str, tag: str) -> None:
        """SIGTERM, then SIGKILL: the legacy virtiofsd can miss SIGTERM while in accept()."""
        process.signal_group(signal.SIGTERM)
        if not await self._exits(process):
            log.warning(
                kv("virtiofsd ignored SIGTERM, killing it", vm=vm, tag=tag, pid=process.pid)
            )
            process.signal_group(signal.SIGKILL)
            if not await self._exits(process):
                log.error(kv("virtiofsd survived SIGKILL", vm=vm, tag=tag, pid=process.pid))
        status = process.reap()
        process.close()
        log.info(kv("virtiofsd stopped", vm=vm, tag=tag, pid=process.pid, exit=str(status)))

    async def _exits(self, process: BackendProcess) -> bool:
        try:
            async with asyncio.timeout(self._timing.stop_timeout):
                await process.exited.wait()
        except TimeoutError:
            return False
        return True

    @staticmethod
    async def _cancel(tasks: list[asyncio.Task[None]]) -> None:
        """Cancel and wait, without swallowing a cancellation of the caller itself."""
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)

    @staticmethod
    def _close_files(entry: _Supervised) -> None:
        if entry.output is not None:
            entry.output.close()
        if entry.listener is not None:
            entry.listener.close()

    def _remove_files(self, vm: str, tag: str, socket_path: str) -> None:
        registry, fifo = self._paths(vm, tag)
        unlink_socket(socket_path)
        for path in (registry, fifo):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        with contextlib.suppress(OSError):  # other shares of the VM still use it
            os.rmdir(os.path.dirname(registry))


def _ids(share: Share) -> dict[str, str]:
    return {"vm": share.vm, "tag": share.tag}
