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
import time
from collections import defaultdict
from collections.abc import Callable, Coroutine, Iterable
from typing import Any

from .backends import BACKEND_FIX, BackendError, BackendSupervisor
from .config import DROP_IN_DIR, Config, Share
from .inotify import FsEvent, FsEventKind, InotifyWatcher
from .logs import FailureThrottle, kv
from .reconciler import VmSettings, VmWorker, is_socket
from .state import ShareStatus, SocketState, VmStatus

log = logging.getLogger("watcher.daemon")

MAX_REQUESTS_IN_FLIGHT = 32


class Daemon:
    """Owns the inotify watcher and the per-VM worker tasks for one config."""

    def __init__(
        self,
        config: Config,
        *,
        config_path: str | None = None,
        on_config_edit: Callable[[bool], None] = lambda seen: None,
        on_change: Callable[[], None] = lambda: None,
    ) -> None:
        self.config = config
        self._on_change = on_change
        self._config_path = os.path.normpath(os.path.abspath(config_path)) if config_path else None
        self._on_config_edit = on_config_edit
        self._roots: dict[str, int] = {}
        self._arming = False
        self._limiter = asyncio.Semaphore(MAX_REQUESTS_IN_FLIGHT)
        self._throttle = FailureThrottle()
        self._workers: dict[str, tuple[VmWorker, asyncio.Task[None]]] = {}
        self._backend_users: dict[str, set[str]] = defaultdict(set)
        self._watcher = InotifyWatcher(self._on_fs_event)
        self._backends = BackendSupervisor(config.backend, on_state_change=self._backend_changed)
        self._retired: dict[str, Share] = {}
        """socket -> a managed share the config no longer has there (removed, renamed, or
        moved to another socket) whose virtiofsd still runs: kept while a device of its VM may
        use it, released once none does or the VM is gone (see _release_unused_backends). A
        moved share's old virtiofsd is no longer supervised, only kept (BackendSupervisor)."""
        self._first_backend_sync = True
        self._first_sync: asyncio.Task[Any] | None = None
        self._jobs: set[asyncio.Task[Any]] = set()
        self._index_backends()

    # ---- lifecycle --------------------------------------------------------

    def start(self) -> None:
        """Arm the watches (each scans what already exists), then look at every VM."""
        self._watcher.start(asyncio.get_running_loop())
        self._arm_watches()
        self._first_sync = self._background(self._sync_backends())
        self.rescan()

    def apply_config(self, new: Config) -> None:
        """Switch to a new, valid config without a restart.

        VMs whose shares and settings did not change keep their task, and with
        it their retry and backoff state; the others are cancelled and started
        afresh from CH's current state, which is what applies the edit: new
        shares are attached, changed ones replaced, removed ones pruned or
        reported (plan.py).
        """
        old = self.config
        self.config = new  # with the same [backend]: Service reloads keep the one in force
        self._retire_managed_shares(old.vms.values())
        replaced: dict[str, VmWorker] = {}
        for name in list(self._workers):
            if self._vm_settings_changed(old, new, name):
                worker, task = self._workers.pop(name)
                task.cancel()
                replaced[name] = worker
        self._index_backends()
        self._arm_watches()
        self._background(self._sync_backends())
        for name in self.config.vms:
            self._sync_vm(name, replaced.get(name))
        self._on_change()

    async def stop(self) -> None:
        """Cancel every VM task and close the watcher; safe mid-backoff or mid-request.

        Managed virtiofsd processes are left running for their VMs (backends.py):
        the next daemon adopts them."""
        self._watcher.close()
        tasks = [task for _, task in self._workers.values()] + list(self._jobs)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._workers.clear()
        await self._backends.close()

    async def first_look(self, timeout: float) -> None:
        """Wait until CH answered (or not) for every VM whose socket exists, and the managed
        virtiofsd that start at once were started, at most `timeout` seconds: READY=1 is
        meant to say the host was looked at, but a hung CH must not hold the service in
        "activating"."""
        deadline = asyncio.get_running_loop().time() + timeout
        while (self._first_sync is not None and not self._first_sync.done()) or any(
            w.status.socket is SocketState.CHECKING for w, _ in self._workers.values()
        ):
            if asyncio.get_running_loop().time() >= deadline:
                return
            await asyncio.sleep(0.01)

    def retry_backends(self) -> None:
        """A reload that changed nothing still tries again the managed virtiofsd that could
        not be started: the operator may have fixed the host meanwhile (removed what was in
        the way of a socket, installed virtiofsd)."""
        self._background(self._sync_backends())

    def statuses(self) -> list[VmStatus]:
        """Every configured VM, running or not, in config order; each managed share
        with its virtiofsd as the supervisor reports it now."""
        result = []
        for name in self.config.vms:
            running = self._workers.get(name)
            status = running[0].status if running is not None else self._idle_status(name)
            for share in self.config.vms[name]:
                if share.managed and share.tag in status.shares:
                    status.shares[share.tag].backend = self._backends.report(share)
            result.append(status)
        return result

    # ---- events -----------------------------------------------------------

    def rescan(self) -> None:
        for name in self.config.vms:
            self._sync_vm(name)

    def _on_fs_event(self, event: FsEvent) -> None:
        if event.kind is FsEventKind.RESCAN:
            log.info(kv("rescanning", reason="inotify may have lost events"))
            self.rescan()
            self._on_config_edit(False)  # an edit may have been among the lost events
            return
        if self._is_config_file(event.path):
            if not self._arming:  # the first scan of the config folder is not an edit
                self._on_config_edit(not event.scanned)
            return
        vm = self.config.watch.api_socket.vm_for(event.path)
        if vm is not None and vm in self.config.vms:
            self._sync_vm(vm)
        elif vm is not None and not is_socket(event.path):
            self._vm_gone(vm)  # a VM no longer configured may still have had our virtiofsd
        if event.kind is FsEventKind.CREATED and event.is_socket:
            for user in self._backend_users.get(event.path, ()):
                running = self._workers.get(user)
                if running is not None:
                    log.debug(kv("backend socket appeared", vm=user, socket=event.path))
                    running[0].backend_appeared(event.path)

    def _sync_vm(self, name: str, previous: VmWorker | None = None) -> None:
        """Start, poke or cancel the VM's worker according to its API socket file.
        `previous` is the worker a config edit replaced; the new one inherits from it."""
        path = self.config.watch.api_socket.path_for(name)
        running = self._workers.get(name)
        if is_socket(path):
            if running is None:
                running = self._spawn(name, path)
                if previous is not None:
                    running[0].inherit(previous)
            running[0].poke()
        elif running is not None:
            log.info(kv("api socket gone", vm=name, socket=path, action="stopped its work"))
            self._cancel(name)
        else:
            self._vm_gone(name)

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
            backends=self._backends,
            on_observed=self._release_unused_backends,
            on_stale=self._vm_gone,
        )
        task = asyncio.create_task(worker.run(), name=f"vm:{name}")
        task.add_done_callback(lambda t: self._worker_done(name, t))
        self._workers[name] = (worker, task)
        return worker, task

    def _cancel(self, name: str) -> None:
        """The VM went away: stop its work, and the virtiofsd it no longer needs."""
        _, task = self._workers.pop(name)
        task.cancel()
        self._vm_gone(name)
        self._on_change()

    def _vm_gone(self, name: str) -> None:
        """Its CH process is gone and with it every hot-added device: virtiofsd of shares
        no longer configured can go; with start = "on-demand", so can the configured ones."""
        for socket, share in list(self._retired.items()):
            if share.vm == name:
                del self._retired[socket]
                self._background(self._backends.release(share))
        if self.config.backend.start == "on-demand":
            for share in self.config.vms.get(name, ()):
                if share.managed and share.socket in self._backends.supervised():
                    self._background(self._backends.release(share))

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

    # ---- managed backends -------------------------------------------------

    async def _sync_backends(self) -> None:
        """Supervise what the config and the VMs need, at start and after each reload.

        At the first sync, shares an earlier daemon ran a virtiofsd for and the config no
        longer lists are taken over as retired ones. Retired shares of a VM that is not
        running are released; the others stay supervised until their VM's next look shows
        no device on their socket. With [backend] start = "always", every configured
        managed share gets its virtiofsd now, so a VM started by other tools finds it."""
        if self._first_backend_sync:
            self._first_backend_sync = False
            left_over = self._backends.registered(self.config.watch.device_id_prefix)
            self._retire_managed_shares([left_over])
            if self.config.backend.start == "on-demand":
                await self._settle_left_over(left_over)
        configured = {(s.vm, s.tag) for shares in self.config.vms.values() for s in shares}
        for socket, share in list(self._retired.items()):
            if self._retired.get(socket) is not share:
                continue  # released meanwhile by a worker's look at its VM
            if not is_socket(self.config.watch.api_socket.path_for(share.vm)):
                del self._retired[socket]
                await self._backends.release(share)
            elif (share.vm, share.tag) not in configured:  # a moved one is its new socket's
                await self._ensure_backend(share)
        if self.config.backend.start == "always":
            managed = [s for shares in self.config.vms.values() for s in shares if s.managed]
            await asyncio.gather(*(self._ensure_backend(share) for share in managed))

    async def _settle_left_over(self, left_over: list[Share]) -> None:
        """With start = "on-demand", the virtiofsd an earlier daemon left for a configured share
        (it ran with "always", or its VM was up) is adopted while the VM's API socket exists,
        so that it is stopped with the VM; without one it is stopped now."""
        configured = {
            s.socket: s for shares in self.config.vms.values() for s in shares if s.managed
        }
        for left in left_over:
            share = configured.get(left.socket)
            if share is None or (share.vm, share.tag) != (left.vm, left.tag):
                continue  # retired above, or handed over by ensure()
            if is_socket(self.config.watch.api_socket.path_for(share.vm)):
                await self._ensure_backend(share)
            else:
                await self._backends.release(share)

    async def _ensure_backend(self, share: Share) -> None:
        try:
            await self._backends.ensure(share)
        except BackendError as exc:
            self._on_change()  # the status shows the failure: no state change will
            # Throttled like the VM's worker logs it (VmWorker._log_throttled), so a share
            # that the daemon and then its worker cannot start is one line.
            key = f"{share.vm}/{share.tag}"
            if self._throttle.admit_event(key, "backend failed", exc, time.monotonic()) is not None:
                fields = {"vm": share.vm, "tag": share.tag, "reason": str(exc)}
                log.error(kv("backend failed", **fields, fix=BACKEND_FIX))

    def _retire_managed_shares(self, candidates: Iterable[Iterable[Share]]) -> None:
        """Note the managed shares among `candidates` whose socket the config no longer has.
        Not retired: a socket another configured share now uses; the supervisor hands it
        over (BackendSupervisor.ensure)."""
        managed = {s.socket for shares in self.config.vms.values() for s in shares if s.managed}
        configured = {(s.vm, s.tag) for shares in self.config.vms.values() for s in shares}
        for socket in list(self._retired):
            if socket in managed:
                del self._retired[socket]  # configured again: supervised as any share
        taken = managed | set(self._retired)
        for shares in candidates:
            for share in shares:
                if not share.managed or share.socket in taken:
                    continue
                if (share.vm, share.tag) not in configured:  # a moved one: the supervisor says
                    log.info(
                        kv(
                            "virtiofsd of a share no longer configured",
                            vm=share.vm,
                            tag=share.tag,
                            socket=share.socket,
                            action="stopped once no device of the VM uses it",
                        )
                    )
                self._retired[share.socket] = share

    def _release_unused_backends(self, vm: str, in_use: frozenset[str]) -> None:
        """A worker's look at its VM: release the retired virtiofsd no device uses any more
        (pruned, replaced onto another socket, or never attached)."""
        for socket, share in list(self._retired.items()):
            if share.vm == vm and socket not in in_use:
                del self._retired[socket]
                log.info(
                    kv("releasing virtiofsd", vm=vm, tag=share.tag, reason="no device uses it")
                )
                self._background(self._backends.release(share))

    def _backend_changed(self, share: Share) -> None:
        running = self._workers.get(share.vm)
        if running is not None:
            running[0].poke()
        self._on_change()  # the status file shows each managed share's virtiofsd

    def _background(self, job: Coroutine[Any, Any, object]) -> asyncio.Task[Any]:
        """Run backend work beside the VM tasks; stop() cancels what is left."""
        task = asyncio.create_task(job)
        self._jobs.add(task)
        task.add_done_callback(self._job_done)
        return task

    def _job_done(self, task: asyncio.Task[Any]) -> None:
        self._jobs.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error(kv("backend job crashed"), exc_info=task.exception())

    # ---- helpers ----------------------------------------------------------

    def _arm_watches(self) -> None:
        """Watch what the config points at: the API socket tree, every backend
        socket folder and the config folder with mounts.d (one level down)."""
        wanted: dict[str, int] = {}
        pattern = self.config.watch.api_socket
        wanted[pattern.watch_root] = pattern.depth
        for path in self._backend_users:
            directory = os.path.dirname(path)
            wanted[directory] = max(wanted.get(directory, 0), 0)
        for config_file in self._config_files():
            directory = os.path.dirname(config_file)
            wanted[directory] = max(wanted.get(directory, 0), 1)
        for directory, depth in self._roots.items():
            if wanted.get(directory) != depth:
                self._watcher.unwatch(directory)
        self._arming = True
        try:
            for directory, depth in wanted.items():
                if self._roots.get(directory) != depth:
                    self._watcher.watch(directory, depth)
        finally:
            self._arming = False
        self._roots = wanted

    def _config_files(self) -> set[str]:
        """The config path, and where it points if it is a symlink (an edit of the
        target raises events in the target's folder only)."""
        if self._config_path is None:
            return set()
        return {self._config_path, os.path.realpath(self._config_path)}

    def _is_config_file(self, path: str) -> bool:
        if self._config_path is None:
            return False
        if path in self._config_files():
            return True
        drop_ins = os.path.join(os.path.dirname(self._config_path), DROP_IN_DIR)
        return os.path.dirname(path) == drop_ins and path.endswith(".toml")

    def _vm_settings_changed(self, old: Config, new: Config, name: str) -> bool:
        return (
            old.vms.get(name) != new.vms.get(name)
            or old.watch != new.watch
            or old.retry != new.retry
        )

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
        if status.socket is SocketState.STALE:  # is_socket said no: something else is there
            status.detail = (
                f"VM not running: {path} is not a socket, but {_file_kind(path)}; ignored"
                " (CH creates a socket there when the VM starts)"
            )
        for share in self.config.vms[name]:
            status.shares[share.tag] = ShareStatus(tag=share.tag, device_id=share.device_id)
        return status


def _file_kind(path: str) -> str:
    """What lstat finds at ``path``, in words, for a status line."""
    try:
        mode = os.lstat(path).st_mode
    except OSError:
        return "gone"
    for test, words in (
        (stat.S_ISLNK, "a symbolic link"),
        (stat.S_ISDIR, "a folder"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISREG, "a regular file"),
    ):
        if test(mode):
            return words
    return "a special file"
