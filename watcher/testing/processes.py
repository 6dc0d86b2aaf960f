"""The CH double and the stand-in virtiofsd as child processes, for tests and `demo`.

Both are real processes on purpose: killing one with SIGKILL is the only
honest way to leave a stale socket behind the way a crashed CH does (§6), and
a virtiofsd that exits when its frontend disconnects must be a process that
can exit. Readiness is never probed by connecting to a backend socket (it
would become virtiofsd's one connection): the double prints `ready pid=N`,
the backend logs "Waiting for vhost-user socket connection" after listen().
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .chdouble_control import DoubleControl, read_ready_line

START_TIMEOUT = 30.0
DEADLINE = 30.0


class ChildProcess:
    """A child started with asyncio; stop() is idempotent and always reaps it."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def running(self) -> bool:
        return self.proc.returncode is None

    async def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        """Send `sig`, wait for the exit (SIGKILL after `timeout`), return the exit code."""
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)
            try:
                async with asyncio.timeout(timeout):
                    await self.proc.wait()
            except TimeoutError:
                self.proc.kill()
        return await self.proc.wait()

    async def kill(self) -> int:
        return await self.stop(signal.SIGKILL)


class DoubleProcess(ChildProcess):
    """`python -m watcher.testing.chdouble` with a control socket."""

    def __init__(self, proc: asyncio.subprocess.Process, control: DoubleControl, ch_pid: int):
        super().__init__(proc)
        self.control = control
        self.ch_pid = ch_pid

    @classmethod
    async def start(cls, api_socket: str, control_socket: str, *options: str) -> DoubleProcess:
        """Start a double and return once its API socket listens."""
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "watcher.testing.chdouble",
            "--api-socket",
            api_socket,
            "--control-socket",
            control_socket,
            *options,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
        )
        assert proc.stdout is not None
        try:
            async with asyncio.timeout(START_TIMEOUT):
                ch_pid = await read_ready_line(proc.stdout)
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            raise
        return cls(proc, DoubleControl(control_socket), ch_pid)

    async def call(self, cmd: str, **args: Any) -> Any:
        return await self.control.call({"cmd": cmd, **args})

    async def requests(self, path: str | None = None) -> list[dict[str, Any]]:
        """Every API request the double received, optionally only those to `path`."""
        records: list[dict[str, Any]] = await self.call("requests")
        return [r for r in records if path is None or r["path"] == path]


class BackendProcess(ChildProcess):
    """`python -m watcher.testing.fake_virtiofsd`, or any virtiofsd command line."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        super().__init__(proc)
        assert proc.stderr is not None
        self._drain = asyncio.create_task(_drain(proc.stderr))

    async def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        rc = await super().stop(sig, timeout)
        await self._drain
        return rc

    @classmethod
    async def start(cls, argv: Sequence[str], pass_fds: Sequence[int] = ()) -> BackendProcess:
        """Start a backend; return once it logged that it listens."""
        proc = await asyncio.create_subprocess_exec(
            *argv,
            pass_fds=pass_fds,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        assert proc.stderr is not None
        try:
            async with asyncio.timeout(START_TIMEOUT):
                async for line in proc.stderr:
                    if b"Waiting for vhost-user socket connection" in line:
                        break
                else:
                    raise RuntimeError(f"backend {argv[0]} exited before listening")
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            raise
        return cls(proc)

    @classmethod
    async def fake(cls, socket_path: str, shared_dir: str) -> BackendProcess:
        return await cls.start(
            [
                sys.executable,
                "-m",
                "watcher.testing.fake_virtiofsd",
                f"--socket-path={socket_path}",
                f"--shared-dir={shared_dir}",
            ]
        )


async def _drain(stream: asyncio.StreamReader) -> None:
    """Keep reading a child's stderr so a full pipe never blocks it."""
    while await stream.read(65536):
        pass


class DaemonProcess:
    """`virtiofs-reattach run -c CONFIG` as a child process, its stderr collected line by line.

    `on_line` sees each line as it arrives (the demo prints them)."""

    def __init__(
        self,
        config: Path,
        env: dict[str, str] | None = None,
        on_line: Callable[[str], None] = lambda line: None,
    ) -> None:
        self.config = config
        self.env = {**os.environ, **(env or {})}
        self._on_line = on_line
        self.lines: list[str] = []
        self._proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None
        self._changed = asyncio.Condition()

    async def start(self, *extra: str) -> DaemonProcess:
        self._proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "watcher",
            "run",
            "-c",
            str(self.config),
            *extra,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            env=self.env,
        )
        self._reader = asyncio.create_task(self._read())
        return self

    @property
    def proc(self) -> asyncio.subprocess.Process:
        assert self._proc is not None, "start() first"
        return self._proc

    async def _read(self) -> None:
        assert self.proc.stderr is not None
        async for raw in self.proc.stderr:
            line = raw.decode(errors="replace").rstrip("\n")
            self._on_line(line)
            async with self._changed:
                self.lines.append(line)
                self._changed.notify_all()
        async with self._changed:
            self._changed.notify_all()

    def matching(self, pattern: str) -> list[str]:
        regex = re.compile(pattern)
        return [line for line in self.lines if regex.search(line)]

    async def wait_for(self, pattern: str, count: int = 1, timeout: float = DEADLINE) -> str:
        """Wait until `count` log lines match `pattern`; return the last of them."""
        regex = re.compile(pattern)

        def enough() -> bool:
            return sum(1 for line in self.lines if regex.search(line)) >= count

        async with self._changed:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._changed.wait_for(lambda: enough() or self._reader_done())
        if not enough():
            tail = "\n".join(self.lines[-30:])
            raise AssertionError(
                f"no {count} log line(s) matching {pattern!r} within {timeout:g}s;"
                f" log tail:\n{tail}"
            )
        return [line for line in self.lines if regex.search(line)][count - 1]

    def _reader_done(self) -> bool:
        return self._reader is not None and self._reader.done()

    async def stop(self, sig: int = signal.SIGTERM, timeout: float = DEADLINE) -> int:
        if self.proc.returncode is None:
            self.proc.send_signal(sig)
        try:
            async with asyncio.timeout(timeout):
                rc = await self.proc.wait()
        finally:
            if self.proc.returncode is None:
                self.proc.kill()
                await self.proc.wait()
        if self._reader is not None:
            await self._reader
        return rc
