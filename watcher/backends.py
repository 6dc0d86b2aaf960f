"""Run and re-run virtiofsd for managed shares, on sockets the daemon owns.

Why a supervisor: virtiofsd serves exactly ONE vhost-user connection and exits with rc 0 when its
frontend disconnects, and Cloud Hypervisor disconnects at every guest reboot or shutdown, then
reconnects to the same socket path, retrying for 60 s (virtiofsd.md §2, cloud-hypervisor-api.md
§6-§7). So a virtiofsd lasts one VM boot, and the next one has to be waiting before CH's retries
run out. libvirt, Kata, Incus and Proxmox all solve it the same way (virtiofsd.md §3), and so do
we: the daemon binds and owns the listening socket, and starts each virtiofsd with ``--fd=3`` on
it. A CH connect that arrives while no virtiofsd runs waits in the listen backlog and is served by
the next one (observed, virtiofsd.md §2). The socket is never probed by connecting: the probe
would become a virtiofsd's one frontend. The restart loop is ``backends_share``.

Why children outlive the daemon: a daemon restart (upgrade, crash) must not cut a VM's live
connection, and must not leave runaways either.

* Each virtiofsd runs in its own session without PR_SET_PDEATHSIG, so a daemon exit or crash does
  not kill it. ``close()`` (daemon stop) kills and unlinks nothing: a virtiofsd waiting in accept()
  still holds the listener, so a VM that connects while the daemon is down is still served. (One
  that serves has closed its copy after accept(), observed: a VM that reboots while the daemon is
  down gets ECONNREFUSED and retries for 60 s, until the restarted daemon binds a fresh listener.)
* ``<runtime_dir>/<vm>/<tag>.json`` records the virtiofsd's pid and start time. ``ensure()`` in
  the next daemon adopts a live process with the same start time (a pid alone may have been
  reused): it does not unlink or rebind while that process lives, and watches it with a pidfd,
  which works for a process that is not our child. When it exits, a fresh listener is bound and
  the normal loop goes on; the gap is milliseconds and CH retries for 60 s.
* virtiofsd's stdout and stderr go to the FIFO ``<runtime_dir>/<vm>/<tag>.log``, which the daemon
  reads line by line into its own log. An adopting daemon reopens it and drains what was written
  meanwhile; a virtiofsd never gets SIGPIPE while no daemon reads (``backends_files``).
* ``release()`` stops the virtiofsd: SIGTERM, then SIGKILL after a deadline, because the legacy
  virtiofsd sometimes ignores SIGTERM while it waits in accept() (tests/test_vhost_user.py).
  ``registered()`` lists the registry files of shares no longer configured, which a daemon that
  was down while the configuration changed would otherwise leave running, or leave unsupervised
  while a VM still uses them.

A socket whose virtiofsd cannot be started at all (no binary, read-only on the legacy binary) gets
no listener: a CH connect queued on a listener that no virtiofsd will ever serve would hang CH's
VMM thread with no timeout (cloud-hypervisor-api.md §7), while a missing socket makes CH give up
after 60 s with an error.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
from collections.abc import Callable

from .backends_files import SharePaths, read_registration, registrations, unlink_socket
from .backends_process import BackendProcess, terminate
from .backends_share import BackendState, BackendStatus, BackendTiming, ShareBackend
from .backends_virtiofsd import BackendError, Virtiofsd, find_virtiofsd, probe
from .config import BackendSettings, Share
from .logs import FailureThrottle, kv

__all__ = [
    "BACKEND_FIX",
    "BackendError",
    "BackendState",
    "BackendStatus",
    "BackendSupervisor",
    "BackendTiming",
]

log = logging.getLogger("watcher.backends")

BACKEND_FIX = "fix the share in the config (applies at once) or [backend] (needs a daemon restart)"


class BackendSupervisor:
    """Keeps one virtiofsd waiting or serving on each managed share's socket."""

    def __init__(
        self,
        settings: BackendSettings,
        timing: BackendTiming | None = None,
        on_state_change: Callable[[Share], None] = lambda share: None,
    ) -> None:
        """`on_state_change(share)` is called (from the loop) whenever a share's
        virtiofsd changes state, e.g. from starting to listening."""
        self._settings = settings
        self._on_state_change = on_state_change
        self._timing = timing or BackendTiming()
        self._backends: dict[str, ShareBackend] = {}
        self._failed: dict[str, BackendStatus] = {}
        self._leaving: dict[str, tuple[Share, BackendProcess]] = {}
        """Old socket -> the virtiofsd a moved share left there, until release(); see _hand_over."""
        self._locks: dict[str, asyncio.Lock] = {}
        self._probes: dict[str, asyncio.Task[Virtiofsd]] = {}
        self._throttle = FailureThrottle()

    def supervised(self) -> set[str]:
        """Sockets under supervision, including ones whose virtiofsd cannot be started."""
        return set(self._backends) | set(self._failed)

    def status(self, socket: str) -> BackendStatus | None:
        backend = self._backends.get(socket)
        return backend.status() if backend is not None else self._failed.get(socket)

    def report(self, share: Share) -> BackendStatus:
        """``share``'s virtiofsd for the status document; "stopped" when none is supervised
        for it (``start = "on-demand"`` and its VM is not running)."""
        status = self.status(share.socket)
        if status is not None and (status.vm, status.tag) == (share.vm, share.tag):
            return status
        return BackendStatus(share.vm, share.tag, share.socket, "stopped", None, 0, None, None)

    async def ensure(self, share: Share) -> None:
        """Supervise ``share``: afterwards its socket listens (or an adopted virtiofsd holds it).

        Idempotent. It does not wait for virtiofsd to be ready: CH's connect queues in the backlog.
        A changed shared_dir, readonly or cache applies from the next virtiofsd start, so a VM's
        live connection is not cut; a socket that now belongs to another VM or tag is released
        first. When the share moved to this socket, its virtiofsd on the old one is handed over
        (``_hand_over``). Raises BackendError when the share's virtiofsd cannot be started at all.
        """
        if not share.managed:
            raise ValueError(f"share {share.vm}/{share.tag} has no shared_dir: not ours to run")
        async with self._lock(share.socket):
            current = self._backends.get(share.socket)
            if current is not None and (current.share.vm, current.share.tag) != (
                share.vm,
                share.tag,
            ):
                await self._release(current.share)
                current = None
            if current is not None and current.share == share:
                return
            if current is None:
                for moved in [
                    other.share
                    for other in self._backends.values()
                    if (other.share.vm, other.share.tag) == (share.vm, share.tag)
                ]:
                    await self._hand_over(moved)
            try:
                argv = (await self._virtiofsd()).argv(share, self._settings.extra_args)
                if current is not None:
                    current.share, current.argv = share, argv
                    log.info(
                        kv("virtiofsd settings changed, applied at its next start", **_ids(share))
                    )
                    return
                self._backends[share.socket] = await self._open(share, argv)
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

    def registered(self, device_id_prefix: str) -> list[Share]:
        """The shares an earlier daemon ran a virtiofsd for and this one does not supervise.

        For the daemon's start: a share removed from the configuration while the daemon was down
        still has its virtiofsd, and a VM may still use it (a device is not detached without
        [watch] prune). The daemon decides which to supervise on and which to release. The
        queue settings are not recorded; a virtiofsd does not need them.
        """
        return [
            Share(
                vm=vm,
                tag=tag,
                socket=record.socket,
                num_queues=1,
                queue_size=1024,
                device_id=device_id_prefix + tag,
                shared_dir=record.shared_dir,
                readonly=record.readonly,
                cache=record.cache,
            )
            for vm, tag, record in registrations(self._settings.runtime_dir)
            if record.socket not in self._backends
        ]

    async def close(self) -> None:
        """Daemon shutdown: stop watching, but leave every virtiofsd running and every file.

        A virtiofsd waiting in accept() keeps its copy of the listener, so a VM that connects
        while the daemon is down is served; the next daemon adopts it through the registry.
        One a moved share left on its old socket exits when its VM lets go of it.
        """
        for pending in self._probes.values():
            pending.cancel()
        if self._probes:
            await asyncio.wait(self._probes.values())
        running = [await backend.detach() for backend in self._backends.values()]
        running += [process for _, process in self._leaving.values()]
        for process in running:
            if process is not None:
                process.close()
        if count := sum(process is not None for process in running):
            log.info(kv("leaving virtiofsd running for their VMs", count=count))
        self._backends.clear()
        self._failed.clear()
        self._leaving.clear()

    def _lock(self, socket_path: str) -> asyncio.Lock:
        return self._locks.setdefault(socket_path, asyncio.Lock())

    def _paths(self, vm: str, tag: str, socket_path: str) -> SharePaths:
        return SharePaths.of(self._settings.runtime_dir, vm, tag, socket_path)

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

    async def _open(self, share: Share, argv: list[str]) -> ShareBackend:
        """Adopt the registered virtiofsd if it still runs, else bind the socket; start the loop."""
        paths = self._paths(share.vm, share.tag, share.socket)
        folder = os.path.dirname(paths.registry)
        try:
            os.makedirs(folder, mode=0o755, exist_ok=True)
        except OSError as err:
            raise BackendError(f"cannot create {folder}: {err.strerror}") from None
        record = read_registration(paths.registry)
        if record is not None and record.socket in self._leaving:
            record = None  # the moved share's old virtiofsd, just handed over: not to adopt twice
        adopted = None
        if record is not None:
            try:
                adopted = BackendProcess.adopt(record.pid, record.start_ticks)
            except OSError as err:
                raise BackendError(f"cannot watch virtiofsd pid {record.pid}: {err}") from None
        if adopted is not None and record is not None and record.socket != share.socket:
            # The share moved while the daemon was down; its device may still use the old socket.
            old = dataclasses.replace(share, socket=record.socket)
            self._leave_serving(old, adopted)
            adopted = None
        backend = ShareBackend(
            share, argv, paths, self._timing, self._throttle, self._on_state_change
        )
        try:
            backend.open(adopted)
        except OSError as err:
            if adopted is not None:
                adopted.close()
            raise BackendError(f"cannot set up {share.socket}: {err}") from None
        except BackendError:
            if adopted is not None:
                adopted.close()
            raise
        if adopted is not None and record is not None:
            flags = "same" if list(record.argv) == argv else "changed, applied at its next start"
            log.info(
                kv(
                    "adopted virtiofsd left by the previous daemon",
                    **_ids(share),
                    pid=adopted.pid,
                    flags=flags,
                )
            )
        return backend

    async def _hand_over(self, old: Share) -> None:
        """The share moved to another socket and its device is being replaced. Until the guest
        ejects the old device CH keeps its vhost-user connection (cloud-hypervisor-api.md §5),
        and a virtiofsd killed under it makes CH <= v51 exit altogether (§7). So its virtiofsd
        is left running, unsupervised: it exits by itself when CH lets go, and release() of the
        old socket (once the daemon sees no device on it) stops it if it has not. The share's
        files, named by VM and tag, go to its virtiofsd on the new socket."""
        backend = self._backends.pop(old.socket)
        process = await backend.detach()
        if process is None:
            unlink_socket(old.socket)
            log.info(kv("virtiofsd released", **_ids(old)))
            return
        self._leave_serving(old, process)

    def _leave_serving(self, old: Share, process: BackendProcess) -> None:
        unlink_socket(old.socket)  # nothing new may connect there
        self._leaving[old.socket] = (old, process)
        log.info(
            kv(
                "virtiofsd of the share's old socket kept until its device leaves",
                **_ids(old),
                pid=process.pid,
                socket=old.socket,
            )
        )

    async def _release(self, share: Share) -> None:
        self._failed.pop(share.socket, None)
        self._throttle.clear(share.socket)
        leaving = self._leaving.pop(share.socket, None)
        if leaving is not None:
            await terminate(leaving[1], self._timing.stop_timeout, **_ids(share))
            log.info(kv("virtiofsd released", **_ids(share)))
            return
        backend = self._backends.pop(share.socket, None)
        paths = self._paths(share.vm, share.tag, share.socket)
        if backend is None:
            await self._release_unsupervised(paths, share)
            return
        await backend.stop()
        paths.remove()
        log.info(kv("virtiofsd released", **_ids(share)))

    async def _release_unsupervised(self, paths: SharePaths, share: Share) -> None:
        """Stop the virtiofsd a registry names, if it still runs, and remove the share's files;
        but when the share now lives on another socket, those files are its new virtiofsd's."""
        record = read_registration(paths.registry)
        ids = (share.vm, share.tag)
        moved = any((b.share.vm, b.share.tag) == ids for b in self._backends.values())
        if moved or (record is not None and record.socket != share.socket):
            unlink_socket(share.socket)
            return
        process = None if record is None else BackendProcess.adopt(record.pid, record.start_ticks)
        if process is not None:
            await terminate(process, self._timing.stop_timeout, vm=share.vm, tag=share.tag)
        paths.remove()


def _ids(share: Share) -> dict[str, str]:
    return {"vm": share.vm, "tag": share.tag}
