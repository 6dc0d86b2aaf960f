"""The daemon as a systemd service: signals, live config reloads, sd_notify, the status file.

Reloads come from three places and take one path: SIGHUP (`systemctl
reload`), and inotify seeing the main file or a drop-in change. Editors,
`sed -i`, `cp` and config management's atomic renames produce bursts of
events, so edits are debounced (RELOAD_DEBOUNCE) and then the files are read
afresh. A reload that fails validation changes nothing: the last good config
stays in force, every problem is logged at error priority and the status file
says so; a deleted config file counts as invalid, not as "no VMs".

systemd is told what it needs (python-stack.md §6): READY=1 once the watches
are armed and every VM has been looked at, RELOADING=1 (with MONOTONIC_USEC)
and READY=1 around reloads, a one-line STATUS= after every change,
STOPPING=1, and WATCHDOG=1 from the event loop itself so a stuck loop is
caught.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Coroutine
from typing import Any

from . import sdnotify, statusfile
from .config import Config, ConfigError, load_config
from .daemon import Daemon
from .logs import kv
from .state import ShareState, SocketState, VmStatus
from .statusview import counted

log = logging.getLogger("watcher.service")

RELOAD_DEBOUNCE = 0.2
"""Seconds of quiet after the last config-file event before reading the files."""

PUBLISH_INTERVAL = 0.1
"""At most ten status-file writes a second, however many VMs change at once."""

FIRST_LOOK_TIMEOUT = 10.0
"""READY=1 waits this long at most for every running VM's CH to answer."""


def status_line(statuses: list[VmStatus], config_valid: bool) -> str:
    """The STATUS= line, e.g. "3 of 4 VMs running, 7/7 shares attached".

    Shares are those of running VMs; the ones still waiting (pending, waiting
    for a backend or an eject, retrying) and the failed ones are counted only
    when there are any, so a healthy host reads as such at a glance.
    """
    if not statuses:
        line = "no VMs configured"
    else:
        running = [vm for vm in statuses if vm.socket is SocketState.LIVE]
        shares = [share for vm in running for share in vm.shares.values()]
        attached = sum(share.state is ShareState.ATTACHED for share in shares)
        failed = sum(share.state is ShareState.FAILED for share in shares)
        parts = [f"{len(running)} of {counted(len(statuses), 'VM')} running"]
        if shares:
            parts.append(f"{attached}/{counted(len(shares), 'share')} attached")
        if len(shares) - attached - failed:
            parts.append(f"{len(shares) - attached - failed} waiting")
        if failed:
            parts.append(f"{failed} failed")
        line = ", ".join(parts)
    if not config_valid:
        line += "; config invalid, running the last good one"
    return line


class Service:
    """One run of `virtiofs-reattach run`."""

    def __init__(self, config: Config, config_path: str, state_path: str) -> None:
        self.config_path = config_path
        self.state_path = state_path
        self.config_valid = True
        self.problems: tuple[str, ...] = ()
        self.daemon = Daemon(
            config,
            config_path=config_path,
            on_config_edit=self._config_edited,
            on_change=self._changed,
        )
        self._stop = asyncio.Event()
        self._dirty = asyncio.Event()
        self._reload_timer: asyncio.TimerHandle | None = None
        self._reload_task: asyncio.Task[None] | None = None
        self._reload_asked = False
        """A SIGHUP or a seen edit is among the pending reload's causes, not only a rescan."""

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._stop.set)
        loop.add_signal_handler(signal.SIGHUP, self._sighup)
        config = self.daemon.config
        log.info(
            kv(
                "starting",
                config=self.config_path,
                vms=len(config.vms),
                api_socket=config.watch.api_socket.template,
            )
        )
        self.daemon.start()
        self._changed()  # `status` must see the daemon at once, even with no VM running
        background = [asyncio.create_task(self._publisher(), name="publisher")]
        interval = sdnotify.watchdog_interval()
        if interval is not None:
            background.append(asyncio.create_task(sdnotify.watchdog_loop(interval)))
        if await self._until_stopped(self.daemon.first_look(FIRST_LOOK_TIMEOUT)):
            sdnotify.ready(self._status_line())
            log.info(kv("ready", status=self._status_line()))
            await self._stop.wait()
        log.info(kv("stopping", reason="signal"))
        sdnotify.stopping()
        if self._reload_timer is not None:
            self._reload_timer.cancel()
        if self._reload_task is not None:
            self._reload_task.cancel()
        await self.daemon.stop()
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        self._publish_now()
        return 0

    async def _until_stopped(self, work: Coroutine[Any, Any, None]) -> bool:
        """Run `work` unless a stop signal comes first; True if it finished.
        SIGTERM must end the daemon within seconds even during start-up."""
        task = asyncio.create_task(work)
        stop = asyncio.create_task(self._stop.wait())
        await asyncio.wait({task, stop}, return_when=asyncio.FIRST_COMPLETED)
        for pending in (task, stop):
            pending.cancel()
        await asyncio.gather(task, stop, return_exceptions=True)
        return not self._stop.is_set()

    # ---- reloads ---------------------------------------------------------

    def _sighup(self) -> None:
        log.info(kv("reload requested", reason="SIGHUP"))
        self._reload_asked = True
        self._start_reload()

    def _config_edited(self, seen: bool = True) -> None:
        """Debounce: every event pushes the reload back until the edits settle. `seen` is
        False for a rescan, which re-reads the files in case an edit's event was lost."""
        self._reload_asked |= seen
        if self._reload_timer is not None:
            self._reload_timer.cancel()
        loop = asyncio.get_running_loop()
        self._reload_timer = loop.call_later(RELOAD_DEBOUNCE, self._start_reload)

    def _start_reload(self) -> None:
        if self._reload_timer is not None:  # SIGHUP while an edit's debounce is pending
            self._reload_timer.cancel()
        self._reload_timer = None
        if self._reload_task is not None and not self._reload_task.done():
            self._config_edited(seen=False)  # one at a time; read again after it
            return
        self._reload_task = asyncio.create_task(self._reload(), name="reload")

    async def _reload(self) -> None:
        sdnotify.reloading()
        try:
            await self._load_and_apply()
        except Exception as exc:  # a bug: say so, and keep running on what is in force
            log.exception(kv("reload crashed", config=self.config_path))
            self._reload_failed((f"{self.config_path}: reload failed ({exc!r}; a bug)",))
        finally:
            # Also after a bug: under Type=notify-reload, `systemctl reload` waits for it.
            self._changed()
            sdnotify.ready(self._status_line())

    async def _load_and_apply(self) -> None:
        asked, self._reload_asked = self._reload_asked, False
        in_force = self.daemon.config.backend
        try:
            new = await asyncio.to_thread(load_config, self.config_path)
            if new.backend != in_force:
                log.warning(
                    kv(
                        "[backend] changes apply after a restart of the daemon",
                        action="keeping the [backend] in force until then",
                    )
                )
                new = await asyncio.to_thread(load_config, self.config_path, backend=in_force)
        except ConfigError as exc:
            self._reload_failed(exc.problems)
            return
        was_valid = self.config_valid
        self.config_valid, self.problems = True, ()
        if new == self.daemon.config:
            # After a rescan that found no edit, there is nothing to tell.
            level = logging.INFO if asked or not was_valid else logging.DEBUG
            log.log(level, kv("config unchanged" if was_valid else "config valid again"))
            if asked:
                self.daemon.retry_backends()
        else:
            self.daemon.apply_config(new)
            log.info(kv("config reloaded", vms=len(new.vms), files=len(new.files)))

    def _reload_failed(self, problems: tuple[str, ...]) -> None:
        self.config_valid, self.problems = False, problems
        for problem in problems:
            log.error(kv("config invalid", problem=problem))
        log.error(
            kv("reload failed", action="keeping the last good config", problems=len(problems))
        )

    # ---- publishing ------------------------------------------------------

    def _changed(self) -> None:
        self._dirty.set()

    async def _publisher(self) -> None:
        """Write the status file and STATUS= after changes, coalescing bursts,
        and at least every HEARTBEAT seconds."""
        while True:
            # A rewrite at least every HEARTBEAT lets `status` tell a hung daemon.
            # asyncio.timeout, not wait_for: on 3.11 wait_for swallows a cancel that
            # races the event being set, and stop() would then hang.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(statusfile.HEARTBEAT):
                    await self._dirty.wait()
            self._dirty.clear()
            document = self._document()
            await asyncio.to_thread(statusfile.write, self.state_path, document)
            sdnotify.status(self._status_line())
            await asyncio.sleep(PUBLISH_INTERVAL)

    def _publish_now(self) -> None:
        statusfile.write(self.state_path, self._document())

    def _document(self) -> statusfile.Document:
        return statusfile.render(
            self.daemon.statuses(),
            config_path=self.config_path,
            config_files=list(self.daemon.config.files),
            config_valid=self.config_valid,
            problems=list(self.problems),
        )

    def _status_line(self) -> str:
        return status_line(self.daemon.statuses(), self.config_valid)
