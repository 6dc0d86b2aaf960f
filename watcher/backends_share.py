"""One managed share's restart loop: one virtiofsd after the other on the share's listener.

virtiofsd exits with rc 0 whenever its VM disconnects (reboot, shutdown, CH exit), and CH
reconnects to the same path for only 60 s (virtiofsd.md §2, cloud-hypervisor-api.md §6-§7). So:

* rc 0 → the next virtiofsd starts at once, and is waiting before CH reconnects;
* any other end soon after the start is a crash loop (missing shared_dir, bad extra_args): the
  restarts back off exponentially, the reason (virtiofsd's last output line) is logged once
  through a FailureThrottle, and a retry's output lines that repeat the failed run's go to debug;
* the next virtiofsd starts only after the previous one has exited and been reaped, so two never
  wait on one listener;
* a virtiofsd that reaches accept() after failures logs "virtiofsd recovered" once, so the journal
  says the problem is over, not only that it began.

The listener stays bound during backoff. A CH connect made then waits in the backlog and is
served as soon as an attempt succeeds (say, once the shared_dir appears), but CH has no timeout
on the vhost-user handshake, so its VMM thread waits as long (cloud-hypervisor-api.md §7). Hence
the ``backoff`` state in ``status()``: a reason to hold off ``vm.add-fs``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from .backends_files import (
    OutputFifo,
    Registration,
    SharePaths,
    bind_listener,
    write_registration,
)
from .backends_process import BackendProcess, terminate
from .backends_virtiofsd import BackendError
from .config import Share
from .logs import FailureThrottle, kv

log = logging.getLogger("watcher.backends")

BackendState = Literal[
    "starting", "listening", "serving", "adopted", "backoff", "failed", "stopped"
]
"""starting: spawned, not accepting yet; listening: waiting for its VM; serving: connected;
adopted: started by an earlier daemon, phase unknown until it logs; backoff: waiting to retry
after a failure; failed: cannot be started at all (``last_error`` says why), no socket;
stopped: not supervised (``start = "on-demand"`` and its VM is not running)."""

MISSING_DIR_FIX = "create the folder or fix shared_dir in the config"

_LISTENING = ("Waiting for vhost-user socket connection",)
_SERVING = ("Client connected", "Received vhost-user socket connection")
"""virtiofsd's lines for reaching accept() and returning from it: Rust and legacy (observed)."""


@dataclass(frozen=True)
class BackendTiming:
    """Restart backoff and stop deadline, in seconds."""

    initial_delay: float = 0.5
    max_delay: float = 30.0
    healthy_after: float = 10.0
    """A run at least this long was not part of a crash loop: the backoff starts over."""
    stop_timeout: float = 2.0
    """How long SIGTERM, then SIGKILL, may take."""


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
    fix: str | None = None
    """What a human must change to end the current failure, when we can tell."""


class ShareBackend:
    """One managed share's listener, current virtiofsd, restart loop and history."""

    def __init__(
        self,
        share: Share,
        argv: list[str],
        paths: SharePaths,
        timing: BackendTiming,
        throttle: FailureThrottle,
        on_state: Callable[[Share], None] = lambda share: None,
    ) -> None:
        self._on_state = on_state
        self._state: BackendState = "starting"
        self.share = share
        self.argv = argv  # both replaced when the configuration changes; used at the next start
        self.paths = paths
        self.timing = timing
        self.throttle = throttle
        self.output: OutputFifo | None = None
        self.listener: socket.socket | None = None
        self.process: BackendProcess | None = None
        self.runs = 0
        self.last_exit: str | None = None
        self.last_error: str | None = None
        self.fix: str | None = None
        self._started_at: float | None = None
        self._failing = False
        self._run_lines: deque[str] = deque(maxlen=64)
        self._repeat_lines: frozenset[str] = frozenset()
        self._task: asyncio.Task[None] | None = None

    @property
    def state(self) -> BackendState:
        return self._state

    @state.setter
    def state(self, value: BackendState) -> None:
        """Every change is reported: whether CH may be pointed at the socket depends on it."""
        if value != self._state:
            self._state = value
            self._on_state(self.share)

    def open(self, adopted: BackendProcess | None) -> None:
        """Open the FIFO and the listener (or watch ``adopted``, which holds its own), and start.

        On error nothing stays open; ``adopted`` is the caller's to close.
        """
        try:
            self.output = OutputFifo(self.paths.fifo, self._on_output)
            if adopted is None:
                self.listener = bind_listener(self.paths.socket)
        except BaseException:
            self._close_files()
            raise
        if adopted is not None:
            self.process, self.state, self.runs = adopted, "adopted", 1
        self._task = asyncio.create_task(self._run(), name=f"virtiofsd {self.paths.socket}")

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
            fix=self.fix,
        )

    async def stop(self) -> None:
        """Stop the loop and the virtiofsd, close our descriptors; the files stay."""
        await self._cancel()
        if self.process is not None:
            await terminate(self.process, self.timing.stop_timeout, **self._ids())
            self.process = None
            if self.output is not None:
                self.output.flush()
        self._close_files()

    async def detach(self) -> BackendProcess | None:
        """Stop the loop, close our descriptors, leave the virtiofsd running; return it, still
        watched (the caller closes it), or None if none ran."""
        await self._cancel()
        process, self.process = self.process, None
        self._close_files()
        return process

    async def _cancel(self) -> None:
        # asyncio.wait, not await: a cancellation of the caller itself must not be swallowed.
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait([self._task])

    def _close_files(self) -> None:
        if self.output is not None:
            self.output.close()
            self.output = None
        if self.listener is not None:
            self.listener.close()
            self.listener = None

    def _ids(self) -> dict[str, str]:
        return {"vm": self.share.vm, "tag": self.share.tag}

    async def _run(self) -> None:
        try:
            await self._restart_loop()
        except Exception as err:
            # A bug here must not pass silently: the share would just stop being served.
            log.exception(kv("virtiofsd supervision crashed", **self._ids()))
            self.state, self.last_error = "failed", repr(err)

    async def _restart_loop(self) -> None:
        timing = self.timing
        loop = asyncio.get_running_loop()
        backoff, delay = timing.initial_delay, 0.0
        while True:
            if self.process is None:
                if delay > 0:
                    self.state = "backoff"
                    await asyncio.sleep(delay)
                try:
                    self._start()
                except (OSError, BackendError) as err:
                    delay, backoff = backoff, min(backoff * 2, timing.max_delay)
                    self._report_failure("could not start", str(err), delay)
                    continue
            process = self.process
            assert process is not None
            assert self.output is not None
            await process.exited.wait()
            self.output.flush()  # its last lines, before they are taken for the next one's
            status = process.reap()
            process.close()
            self.process, self.last_exit = None, str(status)
            if status.clean or (status.code is None and status.signal is None):
                # Its VM disconnected; or it was adopted, is not our child, and had been serving.
                backoff, delay = timing.initial_delay, 0.0
                self._failure_over()
                log.info(kv("virtiofsd exited, starting the next", **self._ids(), pid=process.pid))
                continue
            ran = None if self._started_at is None else loop.time() - self._started_at
            if ran is None or ran >= timing.healthy_after:
                backoff = timing.initial_delay
            delay, backoff = backoff, min(backoff * 2, timing.max_delay)
            self._repeat_lines = frozenset(self._run_lines)
            # Killed (by hand, the OOM killer): its last line is no reason, the signal is.
            reason = self._run_lines[-1] if self._run_lines else "no output"
            if status.signal is not None:
                reason = str(status)
            self.fix = None if await self._shared_dir_exists() else MISSING_DIR_FIX
            self._report_failure(str(status), reason, delay)

    def _start(self) -> None:
        assert self.output is not None
        if self.listener is None:  # after an adopted virtiofsd, which held the old one
            self.listener = bind_listener(self.paths.socket)
        self._run_lines.clear()
        output = self.output.writer()
        try:
            process = BackendProcess.spawn(self.argv, self.listener.fileno(), output)
        finally:
            os.close(output)
        self.process, self.state, self.runs = process, "starting", self.runs + 1
        self._started_at = asyncio.get_running_loop().time()
        # In a crash loop each attempt is news only at debug level; the failure is logged once.
        log.log(
            logging.DEBUG if self._failing else logging.INFO,
            kv("virtiofsd started", **self._ids(), pid=process.pid, run=self.runs),
        )
        record = Registration(
            process.pid,
            process.ticks,
            self.paths.socket,
            tuple(self.argv),
            self.share.shared_dir or "",
            self.share.readonly,
            self.share.cache,
        )
        try:
            write_registration(self.paths.registry, record)
        except OSError as err:
            # It runs and serves all the same; only a daemon restart would not find it.
            log.warning(kv("cannot write registry file", path=self.paths.registry, error=err))

    async def _shared_dir_exists(self) -> bool:
        """Asked after a failed run, whatever virtiofsd said: its wording differs by version.
        In a thread, because a hung mount must not stall the event loop."""
        shared_dir = self.share.shared_dir
        return shared_dir is None or await asyncio.to_thread(os.path.isdir, shared_dir)

    def _failure_over(self) -> None:
        """The next failure is news again; ``last_error`` stays, as history."""
        self._failing, self._repeat_lines, self.fix = False, frozenset(), None
        self.throttle.clear(self.paths.socket)

    def _report_failure(self, how: str, reason: str, delay: float) -> None:
        self._failing, self.last_error = True, reason
        now = asyncio.get_running_loop().time()
        held_back = self.throttle.admit(self.paths.socket, f"{how}: {reason}", now)
        if held_back is not None:
            log.error(
                kv(
                    "virtiofsd failed",
                    **self._ids(),
                    exit=how,
                    reason=reason,
                    retry_in=f"{delay:g}s",
                    repeats=held_back or None,
                    fix=self.fix,
                )
            )

    def _on_output(self, line: str) -> None:
        """One line of virtiofsd's output into the daemon's log, and into the share's state."""
        if not line:
            return
        self._run_lines.append(line)
        pid = None if self.process is None else self.process.pid
        if any(marker in line for marker in _LISTENING):
            self.state = "listening"
        elif any(marker in line for marker in _SERVING):
            self.state = "serving"
        if self._failing and self.state in ("listening", "serving"):
            self._failure_over()
            log.info(kv("virtiofsd recovered", **self._ids(), pid=pid))
        level = logging.ERROR if "ERROR" in line else logging.INFO
        if line in self._repeat_lines:
            level = logging.DEBUG
        log.log(level, kv("virtiofsd", **self._ids(), pid=pid, out=line))
