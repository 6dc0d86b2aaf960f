"""The daemon: inotify events in, one reconcile task per running VM out.

Theory of operation. Events only ever name a VM (style.md, controller-runtime):
- an API socket path created or moved in → that VM's worker is started (or,
  if it runs, poked: the ping inside tells a new CH process by its pid);
- an API socket path removed → that VM's worker is cancelled at once;
- a backend socket path created → the workers of the VMs using it are poked;
- RESCAN (overflow, undecodable name, a watched folder recreated) → every
  configured VM is looked at again from the file system.
Whether a VM "runs" is decided from the file system (lstat says socket) and
then by the worker's ping, never from the event itself. Workers run
concurrently, so a hung CH never delays another VM; a semaphore bounds the
number of API requests in flight (each holds a file descriptor).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import stat
from collections import defaultdict
from collections.abc import Callable

from .config import Config
from .inotify import FsEvent, FsEventKind, InotifyWatcher
from .logs import FailureThrottle, kv
from .reconciler import VmSettings, VmWorker
from .state import ShareStatus, SocketState, VmStatus

log = logging.getLogger("watcher.daemon")

MAX_REQUESTS_IN_FLIGHT = 32


def is_socket(path: str) -> bool:
    try:
        return stat.S_ISSOCK(os.lstat(path).st_mode)
    except OSError:
        return False


class Daemon:
    """Owns the inotify watcher and the per-VM worker tasks for one config."""

    def __init__(self, config: Config, on_change: Callable[[], None] = lambda: None) -> None:
        self.config = config
        self._on_change = on_change
        self._limiter = asyncio.Semaphore(MAX_REQUESTS_IN_FLIGHT)
        self._throttle = FailureThrottle()
        self._workers: dict[str, tuple[VmWorker, asyncio.Task[None]]] = {}
        self._backend_users: dict[str, set[str]] = defaultdict(set)
        self._watcher = InotifyWatcher(self._on_fs_event)
        self._index_backends()

    # ---- lifecycle --------------------------------------------------------

    def start(self) -> None:
        """Arm the watches (each scans what already exists), then look at every VM."""
        self._watcher.start(asyncio.get_running_loop())
        pattern = self.config.watch.api_socket
        self._watcher.watch(pattern.watch_root, pattern.depth)
        for directory in sorted({os.path.dirname(path) for path in self._backend_users}):
            self._watcher.watch(directory, 0)
        self.rescan()

    async def stop(self) -> None:
        """Cancel every VM task and close the watcher; safe mid-backoff or mid-request."""
        self._watcher.close()
        tasks = [task for _, task in self._workers.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._workers.clear()

    def statuses(self) -> list[VmStatus]:
        """Every configured VM, running or not, in config order."""
        result = []
        for name in self.config.vms:
            running = self._workers.get(name)
            if running is not None:
                result.append(running[0].status)
            else:
                result.append(self._idle_status(name))
        return result

    # ---- events -----------------------------------------------------------

    def rescan(self) -> None:
        for name in self.config.vms:
            self._sync_vm(name)

    def _on_fs_event(self, event: FsEvent) -> None:
        if event.kind is FsEventKind.RESCAN:
            log.info(kv("rescanning", reason="inotify may have lost events"))
            self.rescan()
            return
        vm = self.config.watch.api_socket.vm_for(event.path)
        if vm is not None and vm in self.config.vms:
            self._sync_vm(vm)
        if event.kind is FsEventKind.CREATED and event.is_socket:
            for user in self._backend_users.get(event.path, ()):
                running = self._workers.get(user)
                if running is not None:
                    log.info(kv("backend socket appeared", vm=user, socket=event.path))
                    running[0].poke()

    def _sync_vm(self, name: str) -> None:
        """Start, poke or cancel the VM's worker according to its API socket file."""
        path = self.config.watch.api_socket.path_for(name)
        running = self._workers.get(name)
        if is_socket(path):
            if running is None:
                running = self._spawn(name, path)
            running[0].poke()
        elif running is not None:
            log.info(kv("api socket gone", vm=name, socket=path, action="stopped its work"))
            self._cancel(name)

    def _spawn(self, name: str, path: str) -> tuple[VmWorker, asyncio.Task[None]]:
        worker = VmWorker(
            name,
            path,
            self.config.vms[name],
            VmSettings(
                device_id_prefix=self.config.watch.device_id_prefix,
                prune=self.config.watch.prune,
                retry=self.config.retry,
            ),
            limiter=self._limiter,
            on_change=self._on_change,
            throttle=self._throttle,
        )
        task = asyncio.create_task(worker.run(), name=f"vm:{name}")
        task.add_done_callback(lambda t: self._worker_done(name, t))
        self._workers[name] = (worker, task)
        return worker, task

    def _cancel(self, name: str) -> None:
        _, task = self._workers.pop(name)
        task.cancel()
        self._on_change()

    def _worker_done(self, name: str, task: asyncio.Task[None]) -> None:
        """A worker only ends by cancellation; anything else is a bug worth a traceback."""
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            log.error(kv("vm task crashed", vm=name), exc_info=exc)
        with contextlib.suppress(KeyError):
            if self._workers[name][1] is task:
                del self._workers[name]

    # ---- helpers ----------------------------------------------------------

    def _index_backends(self) -> None:
        self._backend_users.clear()
        for name, shares in self.config.vms.items():
            for share in shares:
                self._backend_users[share.socket].add(name)

    def _idle_status(self, name: str) -> VmStatus:
        path = self.config.watch.api_socket.path_for(name)
        status = VmStatus(name=name, api_socket=path)
        status.socket = SocketState.STALE if os.path.lexists(path) else SocketState.ABSENT
        status.detail = "VM not running"
        for share in self.config.vms[name]:
            status.shares[share.tag] = ShareStatus(tag=share.tag, device_id=share.device_id)
        return status
