"""A Cloud Hypervisor stand-in that serves CH's REST API on a unix socket, for tests and demos.

It reproduces what a client of CH can observe (cloud-hypervisor-api.md, "Test-double
checklist"), release by release (`chdouble_profiles`), because the daemon is built on exactly
those observations:
- the API is served by one thread: requests from all connections run **one at a time**, so a
  `vm.add-fs` waiting up to 60 s for its virtiofsd blocks `vmm.ping` too (§9); at most 10
  connections, and CH never closes one itself (§1);
- hot-added fs go into the VM config and survive reboots; every reboot or shutdown drops the
  vhost-user connections (a virtiofsd then exits) and the next boot reconnects each device
  within the 60 s window, holding the API meanwhile; a guest-initiated reboot that cannot
  reconnect makes CH exit with status 1 (§6, §7);
- `vm.remove-device` answers 204 at once but the device stays in `device_tree` until the guest
  ejects it, and its id cannot be reused before (§5);
- the socket is bound before any VM exists; v53+ takes `<path>.lock` and replaces a stale socket,
  older releases refuse to start over one; who removes the socket at exit depends on the release
  and on how CH ended (§6).

Use it in-process (`CloudHypervisorDouble`) or as a process:

    python -m watcher.testing.chdouble --api-socket PATH [--profile head|v53|v52|v47]
        [--vm running|created|none] [--no-memory-shared] [--boot-vcpus N]
        [--connect-timeout S] [--retry-interval S] [--eject auto|manual|never]
        [--eject-delay S] [--control-socket PATH] [--pid-file PATH]

The process prints `ready pid=<pid>` on stdout once the API socket listens (and the control
socket, if asked for, accepts), exits 0 on SIGTERM/SIGINT, and otherwise exits the way CH would.
The control socket gives tests the double's observability; see `chdouble_control`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import fcntl
import json
import os
import signal
import socket
import struct
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal

from watcher.testing.chdouble_backends import BackendFailure, connect_backend
from watcher.testing.chdouble_control import serve_control
from watcher.testing.chdouble_http import (
    MAX_CONNECTIONS,
    SERVER_FULL,
    Continue,
    HttpRequest,
    ParseFailure,
    RequestParser,
)
from watcher.testing.chdouble_profiles import (
    PROFILE_NAMES,
    PROFILES,
    ErrorKind,
    ProfileName,
    io_error,
)
from watcher.testing.chdouble_routes import (
    ADD_FS,
    BOOT,
    NOT_SIMULATED,
    REBOOT,
    REMOVE,
    SIMULATED,
    ApiError,
    Reply,
    Route,
    error_reply,
    refuse_before_vmm,
    route_for,
)
from watcher.testing.chdouble_serde import DeserializeError, JsonDocument
from watcher.testing.chdouble_vm import (
    NAMED_AFTER_FS,
    NAMED_BEFORE_FS,
    ConfigInvalid,
    FsConfig,
    FsDevice,
    PciSlotUnavailable,
    RunningVm,
    VmConfig,
    clone_fs,
    json_bytes,
    read_fs_config,
    read_remove_device,
    read_vm_config,
    validate_fs_addition,
    vm_info,
)
from watcher.testing.vhost_user import VhostUserFrontend

FEATURES = ["io_uring", "kvm"]
InitialVm = Literal["running", "created", "none"]
EjectPolicy = Literal["auto", "manual", "never"]
ExitKind = Literal["ok", "error", "killed"]

# `struct flock` for F_OFD_SETLK: l_type, l_whence, l_start, l_len, l_pid (which must be 0).
_FLOCK = struct.Struct("@hhqqi4x")


class DoubleStartError(Exception):
    """The double refused to start, as CH would; `chain` is CH's error chain for it."""

    def __init__(self, chain: list[str]) -> None:
        super().__init__(": ".join(chain))
        self.chain = chain


@dataclass
class RecordedRequest:
    """One API request as the double saw it. Times are `time.monotonic()` seconds."""

    method: str
    path: str
    body: Any
    received_at: float
    started_at: float | None = None
    finished_at: float | None = None
    status: int | None = None
    response: Any = None

    def to_json(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "path": self.path,
            "body": self.body,
            "received_at": self.received_at,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "status": self.status,
            "response": self.response,
        }


class CloudHypervisorDouble:
    """One CH process: its API socket, at most one VM, and that VM's vhost-user connections.

    Observability for tests: `requests`, `events`, `backend_connected()`,
    `connected_backends()`, `connect_attempts()`, `needs_reset()`, `guest_tag()`, `state`,
    `info()`; `wait_until()` waits for any of them to change. Guest behaviour is driven with
    `eject()`, `guest_reboot()` and `set_hung()`.
    """

    def __init__(
        self,
        api_socket: str,
        *,
        profile: ProfileName = "head",
        pid: int | None = None,
        vm: InitialVm = "running",
        memory_shared: bool = True,
        boot_vcpus: int = 1,
        connect_timeout: float = 60.0,
        retry_interval: float = 0.1,
        eject: EjectPolicy = "auto",
        eject_delay: float = 0.05,
        bind_listen_gap: float = 0.0,
    ) -> None:
        self.api_socket = api_socket
        self.profile = PROFILES[profile]
        self.pid = os.getpid() if pid is None else pid
        self.requests: list[RecordedRequest] = []
        self.events: list[dict[str, Any]] = []
        self.exit_code: int | None = None
        self._initial_vm = vm
        self._memory_shared = memory_shared
        self._boot_vcpus = boot_vcpus
        self._connect_timeout = connect_timeout
        self._retry_interval = retry_interval
        self._eject_policy = eject
        self._eject_delay = eject_delay
        self._bind_listen_gap = bind_listen_gap
        self._config: VmConfig | None = None
        self._vm: RunningVm | None = None
        self._api = asyncio.Lock()
        self._not_hung = asyncio.Event()
        self._not_hung.set()
        self._change = asyncio.Event()
        self._exited = asyncio.Event()
        # The VMM thread has ended (vmm.shutdown, an exit): requests are read, never answered.
        self._vmm_gone = False
        self._server: asyncio.Server | None = None
        self._lock_fd: int | None = None
        self._open_connections = 0
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Future[Any]] = set()
        self._shutdown_task: asyncio.Task[None] | None = None
        self._attempts: dict[str, list[int | None]] = {}

    # ---- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Start like CH: socket first (§6 startup order), then the VM the CLI asked for.

        Raises DoubleStartError where CH would exit 1 at startup: the `.lock` is held by a
        running instance (v53+), or the path exists (≤ v52, which v52 then removes anyway).
        """
        try:
            listener = await self._bind()
        except DoubleStartError:
            self.exit_code = 1
            if self.profile.unlink_on_error_exit:
                with contextlib.suppress(OSError):
                    os.unlink(self.api_socket)
            self._release_lock()
            self._exited.set()
            raise
        self._server = await asyncio.start_unix_server(self._serve_connection, sock=listener)
        if self._initial_vm != "none":
            self._config = VmConfig.default(
                boot_vcpus=self._boot_vcpus, memory_shared=self._memory_shared
            )
        if self._initial_vm == "running":
            self._event("vm", "booting")
            await self._boot(BOOT)
            self._event("vm", "booted")

    async def stop(self, clean: bool = True) -> None:
        """End the process: `clean` is SIGTERM (exit 0), otherwise SIGKILL (socket left)."""
        self._exit_soon(0 if clean else -signal.SIGKILL, "ok" if clean else "killed")
        if self._shutdown_task is not None:
            await asyncio.shield(self._shutdown_task)

    async def wait_exited(self) -> int:
        """Wait until the double has exited (on its own or by `stop`); its exit status."""
        await self._exited.wait()
        assert self.exit_code is not None
        return self.exit_code

    async def _bind(self) -> socket.socket:
        # CH runs under umask 077 (main.rs): the socket is 0700, the `.lock` 0600 (§1).
        old_umask = os.umask(0o077)
        try:
            listener = self._bind_path(self.api_socket)
        finally:
            os.umask(old_umask)
        if self._bind_listen_gap:
            # Simulated: CH's bind() and listen() are back to back, a connect in between gets
            # ECONNREFUSED (§6). This widens that window for clients that must cope with it.
            await asyncio.sleep(self._bind_listen_gap)
        listener.listen(128)
        listener.setblocking(False)
        return listener

    def _bind_path(self, path: str) -> socket.socket:
        if self.profile.api_socket_lock:
            self._lock_fd = self._take_lock(path)
            # We hold the lock, so whatever sits at the path is stale (http/mod.rs).
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(path)
        except OSError as error:
            listener.close()
            raise DoubleStartError(
                [
                    "Failed to start the VMM thread",
                    "Error creation API server's socket",
                    io_error(error),
                ]
            ) from None
        return listener

    @staticmethod
    def _take_lock(path: str) -> int:
        fd = os.open(f"{path}.lock", os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o666)
        try:
            fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0))
        except OSError as error:
            os.close(fd)
            if error.errno in (errno.EAGAIN, errno.EACCES):
                raise DoubleStartError(
                    [
                        "Failed to start the VMM thread",
                        f"API socket {json.dumps(path)} is already in use by another running"
                        " instance",
                    ]
                ) from None
            raise DoubleStartError(
                [
                    "Failed to start the VMM thread",
                    "Error creation API server's socket",
                    io_error(error),
                ]
            ) from None
        return fd

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _exit_soon(self, code: int, kind: ExitKind) -> None:
        """The process ends: nothing is answered any more, connections and backends drop."""
        self._vmm_gone = True
        if self._shutdown_task is None and self.exit_code is None:
            self._shutdown_task = asyncio.create_task(self._shutdown(code, kind))

    async def _shutdown(self, code: int, kind: ExitKind) -> None:
        if self._server is not None:
            self._server.close()
        unlink = self._server is not None and (
            kind == "ok" or (kind == "error" and self.profile.unlink_on_error_exit)
        )
        if unlink:
            with contextlib.suppress(OSError):
                os.unlink(self.api_socket)
        current = asyncio.current_task()
        doomed = [task for task in self._tasks if task is not current]
        for task in doomed:
            task.cancel()
        for writer in self._writers:
            writer.transport.abort()
        self._teardown_vm()
        await asyncio.gather(*doomed, return_exceptions=True)
        self._release_lock()
        self.exit_code = code
        self._exited.set()
        self._touch()

    # ---- observability ---------------------------------------------------------------------

    @property
    def state(self) -> Literal["none", "Created", "Running", "Paused"]:
        """`none` when no VM config exists, else what `vm.info` shows as `state`."""
        if self._config is None:
            return "none"
        return "Created" if self._vm is None else self._vm.state

    def info(self) -> dict[str, Any] | None:
        """The `vm.info` body, or None when CH would answer "VM is not created"."""
        if self._config is None:
            return None
        return vm_info(self._config, self._vm, self.profile)

    def backend_connected(self, device_id: str) -> bool:
        """Whether the device holds a live vhost-user connection to its backend."""
        device = self._vm.devices.get(device_id) if self._vm is not None else None
        return device is not None and device.frontend is not None

    def connected_backends(self) -> list[str]:
        """Ids of the devices holding a vhost-user connection."""
        return sorted(d.id for d in self._devices() if d.frontend is not None)

    def needs_reset(self, device_id: str) -> bool:
        """v52+: the device's backend died and was not back in time (§7)."""
        device = self._vm.devices.get(device_id) if self._vm is not None else None
        return device is not None and device.needs_reset

    def guest_tag(self, device_id: str) -> bytes | None:
        """The mount tag the guest sees: the config's tag cut to 36 bytes (§2)."""
        device = self._vm.devices.get(device_id) if self._vm is not None else None
        return None if device is None else device.guest_tag

    def connect_attempts(self, socket_path: str) -> list[int | None]:
        """Every vhost-user connect to `socket_path`: its errno, or None when it succeeded."""
        return list(self._attempts.get(socket_path, []))

    async def wait_until(self, predicate: Callable[[], bool], timeout: float | None = 10.0) -> None:
        """Wait until `predicate()` holds; it is re-checked whenever the double's state changes."""
        async with asyncio.timeout(timeout):
            while not predicate():
                await self._change.wait()

    def _touch(self) -> None:
        self._change.set()
        self._change = asyncio.Event()

    def _event(self, source: str, event: str, properties: dict[str, Any] | None = None) -> None:
        """An `--event-monitor` record, as CH would write it."""
        record: dict[str, Any] = {"source": source, "event": event}
        if properties is not None:
            record["properties"] = properties
        self.events.append(record)
        self._touch()

    def _devices(self) -> list[FsDevice]:
        return [] if self._vm is None else list(self._vm.devices.values())

    # ---- guest behaviour -------------------------------------------------------------------

    def set_hung(self, hung: bool) -> None:
        """Hang the VMM thread: requests are read but not answered until `set_hung(False)`."""
        if hung:
            self._not_hung.clear()
        else:
            self._not_hung.set()

    async def eject(self, device_id: str) -> None:
        """The guest ejects a device whose removal is pending (its ACPI `_EJ0`, §5)."""
        vm = self._vm
        device = vm.devices.get(device_id) if vm is not None else None
        if vm is None or device is None or not device.removal_pending:
            raise ValueError(f"no removal of {device_id!r} is pending")
        self._eject_now(vm, device)

    async def guest_reboot(self) -> bool:
        """The guest resets itself; False when the reboot failed and CH exits with status 1."""
        async with self._api:
            await self._vmm_turn()
            if self._vm is None:
                raise ValueError("no running guest to reboot")
            try:
                await self._reboot()
            except ApiError as error:
                chain = ["VMM thread exited with error", "Error rebooting VM", *error.chain[1:]]
                _print_error_chain(chain)
                self._exit_soon(1, "error")
                return False
            return True

    # ---- HTTP ------------------------------------------------------------------------------

    async def _serve_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            async with self._api:
                # micro_http accepts from its one thread, so even refusing waits its turn.
                if self._open_connections >= MAX_CONNECTIONS:
                    writer.write(SERVER_FULL)
                    with contextlib.suppress(ConnectionError):
                        await writer.drain()
                    writer.close()
                    return
                self._open_connections += 1
            self._writers.add(writer)
            try:
                await self._serve_requests(reader, writer)
            finally:
                self._open_connections -= 1
                self._writers.discard(writer)
                writer.close()
        except asyncio.CancelledError:
            # The double is exiting. Ending quietly: asyncio 3.11's stream callback would log
            # a cancelled connection handler as an unhandled exception.
            pass
        finally:
            self._tasks.discard(task)

    async def _serve_requests(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        parser = RequestParser(self.profile.body_limit)
        while data := await _read(reader):
            for item in parser.feed(data):
                record = None
                if isinstance(item, HttpRequest):
                    record = RecordedRequest(
                        item.method, item.path, _json_or_none(item.body), time.monotonic()
                    )
                    self.requests.append(record)
                    self._touch()
                async with self._api:
                    reply = await self._answer(item, record)
                writer.write(reply.encode() if isinstance(reply, Reply) else reply)
                try:
                    await writer.drain()
                except ConnectionError:
                    return
                if isinstance(reply, Reply) and reply.after is not None:
                    reply.after()

    async def _answer(
        self, item: HttpRequest | ParseFailure | Continue, record: RecordedRequest | None
    ) -> Reply | bytes:
        if not isinstance(item, HttpRequest):
            return item.response()
        assert record is not None
        record.started_at = time.monotonic()
        self._touch()
        reply = await self._dispatch(item)
        record.finished_at = time.monotonic()
        record.status = reply.status
        record.response = _json_or_none(reply.body)
        self._touch()
        return reply

    async def _dispatch(self, request: HttpRequest) -> Reply:
        found = route_for(request.path)
        if found is None:
            return error_reply(404, ["Not Found"])
        name, route = found
        refused = refuse_before_vmm(route, request.method, request.body)
        if refused is not None:
            return refused
        try:
            # Only handlers that take a body deserialize it; the others ignore it.
            takes_body = route.kind == "create" or route.body
            document = JsonDocument(request.body) if takes_body and request.body else None
            if route.kind == "ping":
                return await self._ping()
            if route.kind == "info":
                return await self._vm_info()
            if route.kind == "vmm-shutdown":
                return await self._vmm_shutdown()
            if route.kind == "create":
                assert document is not None
                return await self._vm_create(read_vm_config(document, self.profile))
            return await self._action(name, route, document)
        except DeserializeError as error:
            return error_reply(400, ["Failed to deserialize JSON", str(error)])
        except ApiError as error:
            return error_reply(self.profile.status(error.kind), ["Error from API", *error.chain])

    async def _action(self, name: str, route: Route, document: JsonDocument | None) -> Reply:
        if name == "vm.add-fs":
            assert document is not None
            fs = read_fs_config(document, (), self.profile)
            await self._vmm_turn()
            return await self._add_fs(fs)
        if name == "vm.remove-device":
            assert document is not None
            device_id = read_remove_device(document)
            await self._vmm_turn()
            return self._remove_device(device_id)
        await self._vmm_turn()
        if name not in SIMULATED:
            raise ApiError(ErrorKind.INTERNAL, [route.failure, NOT_SIMULATED])
        handlers: dict[str, Callable[[], Awaitable[None]]] = {
            "vm.boot": self._vm_boot,
            "vm.shutdown": self._vm_shutdown,
            "vm.reboot": self._vm_reboot,
            "vm.pause": self._vm_pause,
            "vm.resume": self._vm_resume,
            "vm.delete": self._vm_delete,
        }
        await handlers[name]()
        return Reply(204, None)

    async def _vmm_turn(self) -> None:
        """Hand the request to the VMM thread: wait while it hangs; never, once it has exited."""
        if not self._vmm_gone:
            await self._not_hung.wait()
        if self._vmm_gone:
            await asyncio.get_running_loop().create_future()

    # ---- VMM actions -----------------------------------------------------------------------

    async def _ping(self) -> Reply:
        await self._vmm_turn()
        profile = self.profile
        body = {
            "build_version": profile.build_version,
            "version": profile.version,
            "pid": self.pid,
            "features": FEATURES,
        }
        return Reply(200, json_bytes(body))

    async def _vm_info(self) -> Reply:
        await self._vmm_turn()
        info = self.info()
        if info is None:
            raise ApiError(
                ErrorKind.NOT_CREATED, ["The VM info is not available", "VM is not created"]
            )
        return Reply(200, json_bytes(info))

    async def _vmm_shutdown(self) -> Reply:
        await self._vmm_turn()
        await self._vm_delete()
        self._event("vmm", "shutdown")
        # The VMM thread ends here: nothing queued behind this request is answered any more,
        # and the process exits once the 200 is out.
        self._vmm_gone = True
        return Reply(200, b"", after=lambda: self._exit_soon(0, "ok"))

    async def _vm_create(self, config: VmConfig) -> Reply:
        await self._vmm_turn()
        if self._config is not None:
            raise ApiError(
                ErrorKind.INTERNAL, ["The VM could not be created", "VM is already created"]
            )
        self._config = config
        self._touch()
        return Reply(204, None)

    async def _vm_boot(self) -> None:
        if self._vm is not None:
            if self.profile.boot_rejects_existing_vm:
                raise ApiError(ErrorKind.INTERNAL, [BOOT, "VM is already created"])
            # ≤ v52 ran Vm::boot's state transition on the existing Vm (§2).
            if self._vm.state == "Running":
                raise ApiError(
                    ErrorKind.INTERNAL,
                    [BOOT, "invalid VM state transition: Running to Running"],
                )
            self._vm.state = "Running"
            self._touch()
            return
        if self._config is None:
            raise ApiError(ErrorKind.NOT_CREATED, [BOOT, "VM config is missing"])
        self._event("vm", "booting")
        await self._boot(BOOT)
        self._event("vm", "booted")

    async def _vm_shutdown(self) -> None:
        if self._vm is None:
            raise ApiError(ErrorKind.INTERNAL, ["The VM could not shutdown", "VM is not running"])
        self._teardown_vm()
        self._event("vm", "shutdown")

    async def _vm_reboot(self) -> None:
        if self._vm is None:
            raise ApiError(ErrorKind.NOT_CREATED, [REBOOT, "VM is not created"])
        await self._reboot()

    async def _vm_pause(self) -> None:
        failure = "The VM could not be paused"
        if self._vm is None:
            raise ApiError(ErrorKind.INTERNAL, [failure, "VM is not running"])
        if self._vm.state == "Paused":
            raise ApiError(
                ErrorKind.INTERNAL,
                [
                    failure,
                    "Cannot pause VM",
                    "Failed to pause migratable component",
                    "Invalid transition: InvalidStateTransition(Paused, Paused)",
                ],
            )
        self._vm.state = "Paused"
        self._event("vm", "paused")

    async def _vm_resume(self) -> None:
        failure = "The VM could not resume"
        if self._vm is None:
            raise ApiError(ErrorKind.INTERNAL, [failure, "VM is not running"])
        if self._vm.state == "Running":
            raise ApiError(
                ErrorKind.INTERNAL,
                [
                    failure,
                    "Cannot resume VM",
                    "Failed to resume migratable component",
                    "Invalid transition: InvalidStateTransition(Running, Running)",
                ],
            )
        self._vm.state = "Running"
        self._event("vm", "resumed")

    async def _vm_delete(self) -> None:
        if self._config is None:
            return
        if self._vm is not None:
            await self._vm_shutdown()
        self._config = None
        self._event("vm", "deleted")

    async def _add_fs(self, fs: FsConfig) -> Reply:
        """`vm_add_fs` (lib.rs:2936-2963) and `DeviceManager::add_fs`, in CH's order (§2)."""
        config = self._config
        if config is None:
            raise ApiError(ErrorKind.NOT_CREATED, [ADD_FS, "VM is not created"])
        try:
            validate_fs_addition(config, fs, self.profile)
        except ConfigInvalid as invalid:
            kind = ErrorKind.ID_CONFLICT if invalid.conflict else ErrorKind.INVALID_CONFIG
            raise ApiError(kind, [ADD_FS, "Failed to validate config", invalid.message]) from None
        vm = self._vm
        if vm is None:
            config.fs = [*(config.fs or []), fs]
            self._touch()
            return Reply(204, None)
        if fs.id is not None and fs.id in vm.nodes:
            raise ApiError(
                ErrorKind.INTERNAL,
                [
                    ADD_FS,
                    "Error from device manager",
                    f"Invalid identifier as it is not unique: {fs.id}",
                ],
            )
        if fs.id is None:
            fs.id = vm.next_device_name("_fs")
        try:
            frontend = await self._connect(fs.socket)
        except BackendFailure as failure:
            raise ApiError(
                ErrorKind.INTERNAL,
                [
                    ADD_FS,
                    "Error from device manager",
                    "Cannot create virtio-fs device",
                    *failure.tail,
                ],
            ) from None
        try:
            device = vm.attach_fs(fs, frontend)
        except PciSlotUnavailable as unavailable:
            frontend.close()
            raise ApiError(ErrorKind.INTERNAL, [ADD_FS, *_slot_failure(unavailable)]) from None
        # "important to ensure the device would be created in case of a reboot" (vm.rs).
        config.fs = [*(config.fs or []), fs]
        self._watch_backend(vm, device)
        self._touch()
        return Reply(200, json_bytes({"id": device.id, "bdf": device.bdf}))

    def _remove_device(self, device_id: str) -> Reply:
        """`vm_remove_device`: config entry gone at once, tree nodes gone at eject (§5)."""
        vm, config = self._vm, self._config
        if vm is None:
            if config is None:
                raise ApiError(ErrorKind.NOT_CREATED, [REMOVE, "VM is not created"])
            if not config.remove_device(device_id):
                raise ApiError(
                    ErrorKind.UNKNOWN_DEVICE,
                    [REMOVE, f"No device with id {json.dumps(device_id)} to remove"],
                )
            self._touch()
            return Reply(204, None)
        assert config is not None
        if device_id not in vm.nodes:
            raise ApiError(
                ErrorKind.UNKNOWN_DEVICE,
                [
                    REMOVE,
                    "Error from device manager",
                    f"Failed to find device corresponding to the given identifier: {device_id}",
                ],
            )
        device = vm.device_for_node(device_id)
        if device is None:
            kind = device_id.removeprefix("_virtio-pci-").removeprefix("__")
            raise ApiError(
                ErrorKind.INTERNAL,
                [
                    REMOVE,
                    "Error from device manager",
                    f"Not allowed to remove this type of device from the VM: {kind}",
                ],
            )
        config.remove_device(device_id)
        if not device.removal_pending:
            device.removal_pending = True
            if self._eject_policy == "auto":
                device.eject_task = self._spawn(self._auto_eject(vm, device))
        self._touch()
        return Reply(204, None)

    # ---- boot, reboot and backends -----------------------------------------------------------

    async def _boot(self, failure: str) -> None:
        """Build the Vm from the config, connecting every fs backend in turn (§6, §7)."""
        config = self._config
        assert config is not None
        entries = clone_fs(config.fs)
        vm = RunningVm.new(config)
        if self.profile.failed_boot_drops_fs:
            config.fs = None
        vm.name_devices(config, NAMED_BEFORE_FS)
        attached: list[FsDevice] = []
        try:
            for entry in entries or []:
                if entry.id is None:
                    # Cold-added entries get their ids now, written back to the config.
                    entry.id = vm.next_device_name("_fs")
                frontend = await self._connect(entry.socket)
                try:
                    attached.append(vm.attach_fs(entry, frontend))
                except PciSlotUnavailable:
                    frontend.close()
                    raise
        except BaseException as error:
            for device in attached:
                _close(device)
            self._touch()
            if isinstance(error, PciSlotUnavailable):
                raise ApiError(ErrorKind.INTERNAL, [failure, *_slot_failure(error)]) from None
            if isinstance(error, BackendFailure):
                raise ApiError(
                    ErrorKind.INTERNAL,
                    [
                        failure,
                        "Error from device manager",
                        "Cannot create virtio-fs device",
                        *error.tail,
                    ],
                ) from None
            raise
        config.fs = entries
        vm.name_devices(config, NAMED_AFTER_FS)
        self._vm = vm
        for device in attached:
            self._watch_backend(vm, device)
        self._touch()

    async def _reboot(self) -> None:
        """`vm_reboot`: drop the Vm (backends disconnect), rebuild it from the same config."""
        self._event("vm", "rebooting")
        self._teardown_vm()
        await self._boot(REBOOT)
        self._event("vm", "rebooted")

    def _teardown_vm(self) -> None:
        vm, self._vm = self._vm, None
        if vm is None:
            return
        for device in vm.devices.values():
            _close(device)
        self._touch()

    async def _connect(self, socket_path: str) -> VhostUserFrontend:
        # Its own task, so that an exit cancels it wherever it was awaited from: CH's kill
        # event aborts a pending vhost-user connect the same way (§7).
        connect = asyncio.ensure_future(
            connect_backend(
                socket_path,
                self.profile,
                window=self._connect_timeout,
                interval=self._retry_interval,
                on_attempt=self._note_attempt,
            )
        )
        self._tasks.add(connect)
        try:
            return await connect
        finally:
            self._tasks.discard(connect)

    def _note_attempt(self, socket_path: str, error: OSError | None) -> None:
        self._attempts.setdefault(socket_path, []).append(None if error is None else error.errno)
        self._touch()

    def _watch_backend(self, vm: RunningVm, device: FsDevice) -> None:
        device.watcher = self._spawn(self._backend_watch(vm, device))

    async def _backend_watch(self, vm: RunningVm, device: FsDevice) -> None:
        """CH's vhost-user worker: on hang-up, reconnect within the window, else give up (§7)."""
        frontend = device.frontend
        assert frontend is not None
        with contextlib.suppress(Exception):
            await frontend.wait_hangup()
        frontend.close()
        device.frontend = None
        self._touch()
        try:
            device.frontend = await self._connect(device.socket)
        except BackendFailure:
            if self.profile.backend_loss_exits_vmm:
                # ≤ v51: the worker writes exit_evt; the VMM shuts down cleanly (exit 0).
                async with self._api:
                    self._exit_soon(0, "ok")
            else:
                device.needs_reset = True
                self._touch()
            return
        self._touch()
        self._watch_backend(vm, device)

    async def _auto_eject(self, vm: RunningVm, device: FsDevice) -> None:
        """A cooperative guest: ejects shortly after the removal request, once it runs."""
        # Simulated: the guest's ACPI hotplug handling takes a moment (§5).
        await asyncio.sleep(self._eject_delay)
        await self.wait_until(lambda: self._vm is not vm or vm.state == "Running", timeout=None)
        if self._vm is vm and device.id in vm.devices:
            self._eject_now(vm, device)

    def _eject_now(self, vm: RunningVm, device: FsDevice) -> None:
        """`eject_device`: the nodes go, the slot is freed, the backend is disconnected."""
        _close(device)
        vm.detach(device)
        self._event("vm", "device-removed", {"id": device.id, "bdf": device.bdf})

    def _spawn(self, coroutine: Awaitable[None]) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task


def _close(device: FsDevice) -> None:
    """Drop a device's connection as CH does when the device goes (the backend then exits)."""
    current = asyncio.current_task()
    for task in (device.watcher, device.eject_task):
        if task is not None and task is not current:
            task.cancel()
    device.watcher = device.eject_task = None
    if device.frontend is not None:
        device.frontend.close()
        device.frontend = None


def _slot_failure(unavailable: PciSlotUnavailable) -> list[str]:
    return [
        "Error from device manager",
        "Failed to find an available PCI device ID",
        str(unavailable),
    ]


def _json_or_none(body: bytes | None) -> Any:
    if not body:
        return None
    try:
        return json.loads(body)
    except ValueError:
        return None


async def _read(reader: asyncio.StreamReader) -> bytes:
    try:
        return await reader.read(65536)
    except ConnectionError:
        return b""


def _print_error_chain(chain: list[str]) -> None:
    """CH's `cli_print_error_chain` on stderr."""
    lines = ["Error: Cloud Hypervisor exited with the following chain of errors:"]
    lines += [f"  {level}: {message}" for level, message in enumerate(chain)]
    print("\n".join(lines), file=sys.stderr, flush=True)


# ---- process mode --------------------------------------------------------------------------


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m watcher.testing.chdouble",
        description="A Cloud Hypervisor API double serving one VM on a unix socket.",
    )
    parser.add_argument("--api-socket", required=True, help="path of the API socket")
    parser.add_argument("--profile", choices=PROFILE_NAMES, default="head")
    parser.add_argument("--vm", choices=["running", "created", "none"], default="running")
    parser.add_argument("--no-memory-shared", dest="memory_shared", action="store_false")
    parser.add_argument("--boot-vcpus", type=int, default=1)
    parser.add_argument("--connect-timeout", type=float, default=60.0)
    parser.add_argument("--retry-interval", type=float, default=0.1)
    parser.add_argument("--eject", choices=["auto", "manual", "never"], default="auto")
    parser.add_argument("--eject-delay", type=float, default=0.05)
    parser.add_argument("--control-socket", help="newline-delimited JSON control socket")
    parser.add_argument("--pid-file", help="write the process id here once ready")
    return parser.parse_args(argv)


async def _run(args: argparse.Namespace) -> int:
    double = CloudHypervisorDouble(
        args.api_socket,
        profile=args.profile,
        vm=args.vm,
        memory_shared=args.memory_shared,
        boot_vcpus=args.boot_vcpus,
        connect_timeout=args.connect_timeout,
        retry_interval=args.retry_interval,
        eject=args.eject,
        eject_delay=args.eject_delay,
    )
    try:
        await double.start()
    except DoubleStartError as error:
        _print_error_chain(error.chain)
        return 1
    loop = asyncio.get_running_loop()
    # CH handles SIGTERM/SIGINT through exit_evt: a clean exit that removes the socket (§6).
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, lambda: asyncio.ensure_future(double.stop(clean=True)))
    control = await serve_control(args.control_socket, double) if args.control_socket else None
    if args.pid_file:
        await asyncio.to_thread(_write_pid_file, args.pid_file)
    print(f"ready pid={os.getpid()}", flush=True)
    code = await double.wait_exited()
    if control is not None:
        control.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(args.control_socket)
    return code


def _write_pid_file(path: str) -> None:
    with open(path, "w", encoding="ascii") as pid_file:
        pid_file.write(f"{os.getpid()}\n")


def main(argv: list[str] | None = None) -> int:
    """Run the double as a process until SIGTERM/SIGINT or until it exits the way CH would."""
    args = _parse_args(argv)
    # CH sets this first thing in main(): the API socket is created 0700 (§1).
    os.umask(0o077)
    return asyncio.run(_run(args))


if __name__ == "__main__":
    sys.exit(main())
