"""Helpers for end-to-end tests: the real daemon as a subprocess, and waiting with deadlines.

No test sleeps to synchronise: it waits for a log line, or polls a condition
until a generous deadline (generous because CI machines can be slow; a test
never asserts on speed).
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from watcher.testing.processes import BackendProcess, DaemonProcess, DoubleProcess

DEADLINE = 30.0


async def eventually(
    check: Callable[[], Awaitable[bool]] | Callable[[], bool],
    what: str,
    timeout: float = DEADLINE,
    interval: float = 0.02,
) -> None:
    """Poll `check` until it is true; fail with `what` when the deadline passes."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for: {what}")
        await asyncio.sleep(interval)


async def includes(values: Awaitable[list[str]], wanted: str) -> bool:
    return wanted in await values


class Host:
    """A simulated CH host in a temp folder: API sockets in ch/, backends in vfs/.

    Everything started through it is stopped by cleanup(), so no test leaves
    a process behind.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.ch_dir = root / "ch"
        self.vfs_dir = root / "vfs"
        self.share_dir = root / "share"
        for directory in (self.ch_dir, self.vfs_dir, self.share_dir):
            directory.mkdir()
        self.config = root / "mounts.toml"
        self.state = root / "state.json"
        self.api_pattern = str(self.ch_dir / "{vm}.sock")
        self.doubles: list[DoubleProcess] = []
        self.backends: list[BackendProcess] = []
        self.daemons: list[DaemonProcess] = []

    def api_socket(self, vm: str) -> str:
        return self.api_pattern.replace("{vm}", vm)

    def managed_socket(self, vm: str, tag: str) -> str:
        return str(self.root / "run" / vm / f"{tag}.sock")

    def backend_socket(self, vm: str, tag: str) -> str:
        return str(self.vfs_dir / f"{vm}-{tag}.sock")

    def write_config(self, vms: dict[str, list[str]], **options: Any) -> None:
        """Write config_text(vms, **options) atomically (like config management would)."""
        tmp = self.config.with_suffix(".tmp")
        tmp.write_text(self.config_text(vms, **options))
        tmp.rename(self.config)

    def config_text(
        self,
        vms: dict[str, list[str]],
        *,
        api_socket: str | None = None,
        extra: str = "",
        share_options: str = "",
        retry_extra: str = "",
        backoff: tuple[float, float] = (0.05, 0.5),
        backend_extra: str = "",
        managed: dict[str, list[tuple[str, str]]] | None = None,
    ) -> str:
        """The mounts.toml write_config writes: backends in vfs/, managed shares in run/."""
        lines = [
            "[watch]",
            f'api_socket = "{api_socket or self.api_pattern}"',
            extra,
            "[retry]",
            f"initial_delay = {backoff[0]}",
            f"max_delay = {backoff[1]}",
            retry_extra,
            "[backend]",
            f'runtime_dir = "{self.root / "run"}"',
            backend_extra,
        ]
        for vm in {**vms, **(managed or {})}:
            lines.append(f"[vm.{vm}]")
            shares = [
                f'{{ tag = "{tag}", socket = "{self.backend_socket(vm, tag)}"{share_options} }}'
                for tag in vms.get(vm, [])
            ]
            shares += [
                f'{{ tag = "{tag}", shared_dir = "{folder}" }}'
                for tag, folder in (managed or {}).get(vm, [])
            ]
            lines.append(f"fs = [{', '.join(shares)}]")
        return "\n".join(lines) + "\n"

    async def start_double(
        self, vm: str, *options: str, api_socket: str | None = None
    ) -> DoubleProcess:
        path = api_socket or self.api_socket(vm)
        control = str(self.root / f"{vm}.ctl")
        double = await DoubleProcess.start(path, control, "--connect-timeout", "5", *options)
        self.doubles.append(double)
        return double

    async def start_backend(self, vm: str, tag: str) -> BackendProcess:
        return await self.start_backend_at(self.backend_socket(vm, tag))

    async def start_backend_at(self, socket_path: str) -> BackendProcess:
        backend = await BackendProcess.fake(socket_path, str(self.share_dir))
        self.backends.append(backend)
        return backend

    async def start_daemon(self, env: dict[str, str] | None = None) -> DaemonProcess:
        daemon = await DaemonProcess(
            self.config, {"VIRTIOFS_REATTACH_STATE": str(self.state), **(env or {})}
        ).start()
        self.daemons.append(daemon)
        return daemon

    def status(self) -> dict[str, Any]:
        """The daemon's state file, or {} while it has not been written."""
        try:
            document: dict[str, Any] = json.loads(self.state.read_text())
        except (FileNotFoundError, ValueError):
            return {}
        return document

    def share_doc(self, vm: str, tag: str) -> dict[str, Any]:
        """The share's object in the state file; {} while it is not there."""
        for vm_doc in self.status().get("vms", []):
            for share in vm_doc["shares"] if vm_doc["name"] == vm else []:
                if share["tag"] == tag:
                    return dict(share)
        return {}

    def share_state(self, vm: str, tag: str) -> str | None:
        state = self.share_doc(vm, tag).get("state")
        return None if state is None else str(state)

    async def cleanup(self) -> None:
        for daemon in self.daemons:
            await daemon.stop(signal.SIGKILL)
        for child in [*self.doubles, *self.backends]:
            await child.kill()
