"""One VM's reconcile loop: read CH's state, apply the plan, retry what can succeed later.

Theory of operation. A `VmWorker` is one asyncio task per VM whose API socket
exists. Events never carry meaning into it: the daemon only `poke()`s it, and
every pass starts from `vmm.ping` + `vm.info` (level-based, see plan.py).
A pass ends in one of three ways:
- done: every share is attached, waiting for something an event will
  announce (a backend socket appearing), or blocked by an error that no retry
  can fix (shared memory off, invalid config): the task sleeps until poked;
- retry: something that time can fix (VM not created yet, CH busy, eject
  pending, a timed-out add-fs whose outcome is unknown): tenacity backs off,
  bounded by [retry], and a poke cuts the wait short;
- stale: the socket file exists but nothing listens (CH died, §6): no retry
  and no CPU until the socket is created again.
The daemon cancels the task the moment the socket is deleted; cancellation
propagates through tenacity's sleep and any in-flight request. A live VM is
also looked at every `[retry] resync` seconds, for losses no event announces.

Identity of a CH process is `vmm.ping`'s pid (inode numbers repeat, §6); a
pidfd on it pokes the task when CH exits, since a SIGKILLed CH leaves its
socket and raises no file event. Errors that block a share are remembered per
pid, so a new CH process, or a config change (a new worker), tries again.
A backend socket CH could not connect to within its 60 s window is avoided
until it is re-created, so one stale file costs one API stall, not one per
retry. Managed shares get their virtiofsd from the BackendSupervisor first and
are attached only once it listens.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import stat
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any

from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_delay,
    stop_never,
)
from tenacity.stop import StopBaseT

from . import plan
from .answers import FIXES, Kind, is_retryable
from .backends import BACKEND_FIX, BackendError, BackendSupervisor
from .chclient import ApiError, BadAnswer, ChClient, NotCloudHypervisor, VmInfo
from .config import RetrySettings, Share
from .logs import FailureThrottle, kv
from .state import ShareState, ShareStatus, SocketState, VmStatus
from .unixhttp import HttpProtocolError

log = logging.getLogger("watcher.reconciler")

STALE_PROBES = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2)
"""Waits between connect attempts before a refused socket counts as stale.

CH binds and listens back to back (microseconds apart) and a CH double or a
v53 restart may unlink and re-bind, so a single ECONNREFUSED right after the
create event is not proof of a dead socket (§6)."""

EJECT_POLL = 1.0
"""Longest wait between looks while a guest ejects a device: CH raises no event we can
see (§5), and the share is missing in the guest until its replacement is added."""

EJECT_PATIENCE = 30.0
"""After this long waiting for a guest to eject a removed device, say so loudly:
the guest most likely lacks ACPI PCI hotplug support (§5)."""


class _RetryPass(Exception):
    """Raised at the end of a pass when something time can fix is still pending."""


class _StaleSocket(Exception):
    """Nobody listens on the API socket; wait for the next create event."""


@dataclass(frozen=True)
class VmSettings:
    device_id_prefix: str
    prune: bool
    retry: RetrySettings


def is_socket(path: str) -> bool:
    """The file exists and is a socket (lstat). For backends this is the only
    check there is: connecting would become virtiofsd's one connection (virtiofsd.md §2)."""
    try:
        return stat.S_ISSOCK(os.lstat(path).st_mode)
    except OSError:
        return False


class VmWorker:
    """Keeps one VM's declared shares attached; see the module docstring."""

    def __init__(
        self,
        name: str,
        api_socket: str,
        shares: Sequence[Share],
        settings: VmSettings,
        *,
        limiter: AbstractAsyncContextManager[Any] | None = None,
        on_change: Callable[[], None] = lambda: None,
        throttle: FailureThrottle | None = None,
        backends: BackendSupervisor | None = None,
        on_observed: Callable[[str, frozenset[str]], None] = lambda vm, in_use: None,
        on_stale: Callable[[str], None] = lambda vm: None,
    ) -> None:
        self.name = name
        self.shares = tuple(shares)
        self.settings = settings
        self.client = ChClient(api_socket, limiter)
        self.status = VmStatus(name=name, api_socket=api_socket, socket=SocketState.CHECKING)
        for share in self.shares:
            self.status.shares[share.tag] = ShareStatus(tag=share.tag, device_id=share.device_id)
        self._on_change = on_change
        self._on_observed = on_observed
        self._on_stale = on_stale
        self._backends = backends
        self._throttle = throttle or FailureThrottle()
        self._poked = asyncio.Event()
        self._pid: int | None = None
        self._blocked: dict[str, str] = {}
        """device id -> reason, for errors no retry can fix; cleared for a new CH pid."""
        self._eject_waiting_since: dict[str, float] = {}
        self._dead_backends: set[str] = set()
        """Backend sockets CH could not connect to for 60 s: not used again until re-created."""
        self._device_sockets: dict[str, str] = {}
        """device id -> socket, as last seen in config.fs. A removed device leaves
        config.fs at once but keeps its backend connection until the guest ejects
        it (§5), and vm.info then no longer says which socket that is."""
        self._ch_exit_fd: int | None = None
        self._detached: set[str] = set()
        """Pruned device ids whose eject we wait for: until then CH holds their backend."""
        self._reported_unmanaged: set[str] = set()
        self._reported_unreachable = False
        """Logged "CH not answering"; "CH answers again" only after a whole pass went well."""

    def inherit(self, previous: VmWorker) -> None:
        """Take over what a worker for the same VM learned before a config edit
        replaced it: the status of shares that did not change (so an edit does
        not make them look new, nor log them again), the sockets of devices
        still being ejected, the CH process and the backends known dead in it.
        Blocked errors are not taken over: a config edit is the documented way
        to try again."""
        for share in self.shares:
            if share in previous.shares:
                self.status.shares[share.tag] = previous.status.shares[share.tag]
        self._device_sockets = dict(previous._device_sockets)
        self._dead_backends = set(previous._dead_backends)
        # Same CH process, as far as we know: the dead backends stay dead (a new pid
        # in the next ping clears them), and its exit must still poke us.
        self._pid = previous._pid
        self._watch_ch(self._pid)

    # ---- driving ---------------------------------------------------------

    def poke(self) -> None:
        """Ask for a pass soon; many pokes before it starts cost one pass."""
        self._poked.set()

    def backend_appeared(self, socket: str) -> None:
        """A backend socket was (re)created: a new virtiofsd listens there."""
        self._dead_backends.discard(socket)
        self.poke()

    async def run(self) -> None:
        """The task body: a pass per poke (the first poke comes from the daemon),
        and a resync pass now and then while CH is live (see RetrySettings.resync)."""
        resync = self.settings.retry.resync
        try:
            while True:
                if self.status.socket is SocketState.LIVE and resync > 0:
                    await self._woken_within(resync * random.uniform(0.9, 1.1))
                else:
                    await self._poked.wait()
                    self._poked.clear()
                await self.reconcile(retry=True)
        finally:
            self._unwatch_ch()

    async def reconcile(self, *, retry: bool) -> None:
        """One pass, or passes with backoff until nothing retryable is left."""
        if not retry:
            with contextlib.suppress(_RetryPass, _StaleSocket):
                await self._pass()
            return
        try:
            async for attempt in AsyncRetrying(
                retry=retry_if_exception_type(_RetryPass),
                wait=self._wait,
                stop=self._stop(),
                sleep=self._sleep,
                before_sleep=self._before_sleep,
                reraise=True,
            ):
                with attempt:
                    await self._pass()
        except _StaleSocket:
            pass
        except _RetryPass as exc:
            self._give_up(str(exc))

    # ---- retry policy ----------------------------------------------------

    def _stop(self) -> StopBaseT:
        give_up = self.settings.retry.give_up_after
        return stop_after_delay(give_up) if give_up > 0 else stop_never

    def _wait(self, state: RetryCallState) -> float:
        """Exponential backoff with jitter, never above max_delay, nor above EJECT_POLL
        while a device's eject is awaited."""
        retry = self.settings.retry
        base = retry.initial_delay * 2 ** (state.attempt_number - 1)
        jitter = random.uniform(0, retry.initial_delay)
        ceiling = retry.max_delay
        ejecting = self._detached or any(
            share.state is ShareState.WAITING_EJECT for share in self.status.shares.values()
        )
        if ejecting:
            ceiling = min(ceiling, EJECT_POLL)
        return float(min(ceiling, base + jitter))

    async def _sleep(self, seconds: float) -> None:
        """Back off, but wake at once when poked: a new CH or backend is news."""
        await self._woken_within(seconds)

    async def _woken_within(self, seconds: float) -> bool:
        """Wait up to `seconds`; True (and the poke consumed) if poked meanwhile."""
        # asyncio.timeout, not wait_for: on 3.11 wait_for swallows a cancel that
        # races a poke, and the task of a VM that went away would live on.
        try:
            async with asyncio.timeout(seconds):
                await self._poked.wait()
        except TimeoutError:
            return False
        self._poked.clear()
        return True

    def _before_sleep(self, state: RetryCallState) -> None:
        upcoming = state.upcoming_sleep
        next_at = time.time() + upcoming
        for share in self.status.shares.values():
            if share.state in (ShareState.RETRYING, ShareState.WAITING_EJECT):
                share.next_try_at = next_at
                share.attempt = state.attempt_number
        self._on_change()

    def _give_up(self, reason: str) -> None:
        for share in self.status.shares.values():
            if share.state in (ShareState.RETRYING, ShareState.WAITING_EJECT):
                self._set(
                    share,
                    ShareState.FAILED,
                    f"gave up after {self.settings.retry.give_up_after:g}s: {share.detail}",
                    fix="restart the VM or edit the config to try again",
                )
        log.error(kv("giving up", vm=self.name, reason=reason))
        self._on_change()

    # ---- one pass --------------------------------------------------------

    async def _pass(self) -> None:
        try:
            await self._identify()
            info = await self.client.info()
            self.status.vm_state = info.state
            self.status.detail = ""
            await self._ensure_managed_backends()
            ejecting = self._ejecting(info)
            steps = plan.plan_vm(
                self.shares,
                info,
                device_id_prefix=self.settings.device_id_prefix,
                prune=self.settings.prune,
                present_backends={s.socket for s in self.shares if self._backend_ready(s)},
                ejecting=ejecting,
            )
            pending = self._detaching(info)  # before the steps, which may detach more
            pending += [reason for step in steps if (reason := await self._apply(step))]
            self._note_unmanaged(steps)
            # A removed device keeps its vhost-user connection until the guest ejects it
            # (§5): its socket is in use until then, and a virtiofsd killed under it makes
            # CH <= v51 exit altogether (§7). Devices removed in this pass are in info.fs.
            self._on_observed(
                self.name, frozenset(d.socket for d in info.fs) | frozenset(ejecting.values())
            )
            if self._reported_unreachable:
                self._reported_unreachable = False
                log.info(kv("CH answers again", vm=self.name, pid=self._pid))
        except ApiError as exc:
            self.status.vm_state = None
            self.status.detail = f"{exc.call}: {exc.answer.reason}"
            self._mark_all_pending_retrying(self.status.detail)
            raise _RetryPass(self.status.detail) from exc
        except (TimeoutError, OSError, HttpProtocolError, BadAnswer) as exc:
            self._unreachable(exc)
            raise _RetryPass(self.status.detail) from exc
        finally:
            self._on_change()
        if pending:
            raise _RetryPass("; ".join(pending))

    def _ejecting(self, info: VmInfo) -> dict[str, str]:
        """Removed devices not yet ejected, with the socket they still hold."""
        for device in info.fs:
            if device.id is not None:
                self._device_sockets[device.id] = device.socket
        self._device_sockets = {
            device_id: socket
            for device_id, socket in self._device_sockets.items()
            if device_id in info.device_tree_ids
        }
        live = {device.id for device in info.fs}
        return {
            device_id: socket
            for device_id, socket in self._device_sockets.items()
            if device_id not in live
        }

    async def _ensure_managed_backends(self) -> None:
        """Managed shares get their virtiofsd before planning (idempotent; with
        [backend] start = "always" the daemon has done it already)."""
        if self._backends is None:
            return
        for share in self.shares:
            if not share.managed or share.device_id in self._blocked:
                continue
            try:
                await self._backends.ensure(share)
            except BackendError as exc:
                self._blocked[share.device_id] = str(exc)
                self._set_for(share, ShareState.FAILED, f"virtiofsd: {exc}", fix=BACKEND_FIX)
                fields = {"vm": self.name, "tag": share.tag, "reason": str(exc), "fix": BACKEND_FIX}
                # The daemon may have said so already (start = "always"): same key, same words.
                self._log_throttled(
                    f"{self.name}/{share.tag}", logging.ERROR, "backend failed", fields
                )

    def _backend_ready(self, share: Share) -> bool:
        """The socket exists; for a managed share, also its virtiofsd has reached
        accept() (or was adopted): a CH connect queued on a listener that no
        virtiofsd will serve, say one that crash-loops, stalls CH's API (§7)."""
        if share.socket in self._dead_backends or not is_socket(share.socket):
            return False
        if not share.managed or self._backends is None:
            return True
        status = self._backends.status(share.socket)
        return status is not None and status.state in ("listening", "serving", "adopted")

    async def _identify(self) -> None:
        """vmm.ping: is this CH, which process, and is anyone listening at all.

        A poke while probing a refusing socket restarts the probes: the socket
        may just have been re-created by a new CH (often right after its
        backends, whose appearance poked us onto the old, dead socket)."""
        probes = iter(STALE_PROBES)
        while True:
            try:
                identity = await self.client.ping()
                break
            except FileNotFoundError:
                self._gone()
                raise _StaleSocket from None
            except ConnectionRefusedError:
                delay = next(probes, None)
                if delay is None:
                    self._stale()
                    raise _StaleSocket from None
                if await self._woken_within(delay):
                    probes = iter(STALE_PROBES)
            except (NotCloudHypervisor, BadAnswer, HttpProtocolError) as exc:
                self._not_ch(str(exc))
                raise _StaleSocket from exc
            except ApiError as exc:  # CH is busy (its connection limit): back off
                self._unreachable(exc)
                raise _RetryPass(self.status.detail) from exc
        self.status.socket = SocketState.LIVE
        self.status.ch_version = identity.version
        if identity.pid != self._pid:
            if self._pid is not None or self._blocked:
                log.info(kv("new CH process", vm=self.name, pid=identity.pid))
                self._forget_shares("a new CH process")
            self._pid = identity.pid
            self._blocked.clear()
            self._dead_backends.clear()
            self._watch_ch(identity.pid)
        self.status.ch_pid = identity.pid

    def _watch_ch(self, pid: int | None) -> None:
        """Be poked when this CH process exits. A CH killed with SIGKILL leaves its
        socket behind and raises no file event (§6); a pidfd says it at once.
        The pid may not be ours to see (CH in another pid namespace): then the
        periodic resync notices instead."""
        self._unwatch_ch()
        if pid is None:
            return
        try:
            fd = os.pidfd_open(pid)
        except OSError:
            return
        self._ch_exit_fd = fd
        asyncio.get_running_loop().add_reader(fd, self._ch_exited)

    def _ch_exited(self) -> None:
        self._unwatch_ch()
        self.poke()

    def _unwatch_ch(self) -> None:
        if self._ch_exit_fd is not None:
            asyncio.get_running_loop().remove_reader(self._ch_exit_fd)
            os.close(self._ch_exit_fd)
            self._ch_exit_fd = None

    async def _apply(self, step: plan.Step) -> str | None:
        """Carry out one step; return why a retry is needed, or None."""
        match step:
            case plan.Satisfied(share):
                self._attached(share, already=True)
            case plan.WaitBackend(share):
                if share.device_id in self._blocked:
                    return None
                if share.managed and self._backends is not None:
                    # The daemon pokes us when this virtiofsd changes state.
                    status = self._backends.status(share.socket)
                    why = status.last_error if status is not None else None
                    self._set_for(
                        share,
                        ShareState.WAITING_BACKEND,
                        f"virtiofsd not ready: {why or 'starting'}",
                        fix=(status.fix or "") if status is not None else "",
                    )
                    return None
                self._set_for(
                    share, ShareState.WAITING_BACKEND, f"waiting for backend socket {share.socket}"
                )
            case plan.WaitEject(share):
                return self._waiting_eject(share)
            case plan.WaitSocket(share, holder):
                detail = f"waiting for device {holder} to leave socket {share.socket}"
                self._set_for(share, ShareState.WAITING_BACKEND, detail)
                return f"{share.tag}: {detail}"
            case plan.Conflict(share, reason, fix):
                # Not remembered per pid: the other device may go; each resync looks again.
                self._set_for(share, ShareState.FAILED, reason, fix=fix)
                self._note_failure(share, "attach refused", f"{reason} (fix: {fix})", logging.ERROR)
            case plan.Attach(share):
                return await self._attach(share)
            case plan.Replace(share, current):
                return await self._replace(share, current.socket)
            case plan.Detach(device_id):
                return await self._detach(device_id)
            case plan.Unmanaged():
                pass  # reported for all of them at once, _note_unmanaged
        return None

    def _note_unmanaged(self, steps: Sequence[plan.Step]) -> None:
        """Devices of ours the config no longer lists, as this look found them: one that is
        gone (removed by hand, or with its CH process) leaves the status, and is news
        again if it comes back."""
        found = [step.device_id for step in steps if isinstance(step, plan.Unmanaged)]
        for device_id in found:
            if device_id not in self._reported_unmanaged:
                log.info(kv("no longer managed", vm=self.name, id=device_id))
        self._reported_unmanaged = set(found)
        self.status.unmanaged = found

    async def _attach(self, share: Share) -> str | None:
        if share.device_id in self._blocked:
            return None
        status = self.status.shares[share.tag]
        sent = "vm.add-fs sent, waiting for CH's answer"
        if status.state in (ShareState.WAITING_EJECT, ShareState.WAITING_BACKEND):
            self._set(status, ShareState.PENDING, sent)  # what it waited for is over
        status.detail, status.next_try_at = sent, None
        self._on_change()
        started = time.monotonic()
        try:
            result = await self.client.add_fs(share)
        except ApiError as exc:
            return await self._attach_refused(share, exc)
        except TimeoutError:
            # §9: the add may still happen inside CH; the next pass re-reads vm.info.
            return self._retrying(share, "vm.add-fs timed out; outcome unknown, re-reading vm.info")
        except (ConnectionError, HttpProtocolError, BadAnswer) as exc:
            return self._retrying(share, f"vm.add-fs failed: {exc or type(exc).__name__}")
        self._attached(
            share,
            already=False,
            hot=result.hot,
            bdf=result.bdf,
            ms=round((time.monotonic() - started) * 1000),
        )
        return None

    async def _attach_refused(self, share: Share, exc: ApiError) -> str | None:
        answer = exc.answer
        if answer.kind is Kind.DUPLICATE_ID:
            # Someone (a previous run of ours, Cocoon) added it meanwhile: look again.
            info = await self.client.info()
            if any(device.id == share.device_id for device in info.fs):
                self._attached(share, already=True)
                return None
            return self._retrying(share, answer.reason)
        if answer.kind is Kind.BACKEND_UNREACHABLE:
            # CH tried for 60 s with its whole API blocked; doing that again on a timer
            # would stall the VM's API over and over. A stale file, most likely: the
            # virtiofsd behind it served an earlier connection and exited (virtiofsd.md §2).
            self._dead_backends.add(share.socket)
            detail = (
                f"CH could not connect to {share.socket} within its connect window"
                f" ({answer.reason}); waiting for the socket to be re-created by a new virtiofsd"
            )
            self._set(self.status.shares[share.tag], ShareState.WAITING_BACKEND, detail)
            self._note_failure(share, "backend unreachable", detail, logging.ERROR)
            return None
        if is_retryable(answer):
            return self._retrying(share, answer.reason)
        fix = FIXES.get(answer.kind, FIXES[Kind.UNEXPECTED])
        self._blocked[share.device_id] = answer.reason
        self._set_for(share, ShareState.FAILED, answer.reason, fix=fix)
        log.error(
            kv(
                "attach failed",
                vm=self.name,
                tag=share.tag,
                id=share.device_id,
                reason=answer.reason,
                fix=fix,
                retry="after the VM restarts or the config changes",
            )
        )
        return None

    async def _replace(self, share: Share, old_socket: str) -> str | None:
        """Settings changed: remove now, re-add once the guest has ejected (§5)."""
        try:
            await self.client.remove_device(share.device_id)
        except ApiError as exc:
            return self._retrying(share, f"remove for replacement failed: {exc.answer.reason}")
        log.info(
            kv("replacing", vm=self.name, tag=share.tag, id=share.device_id, old_socket=old_socket)
        )
        return self._waiting_eject(share)

    async def _detach(self, device_id: str) -> str | None:
        try:
            await self.client.remove_device(device_id)
        except ApiError as exc:
            if exc.answer.kind is Kind.UNKNOWN_DEVICE:
                return None
            self._log_throttled(
                f"{self.name}/{device_id}",
                logging.WARNING,
                "detach failed",
                {"vm": self.name, "id": device_id, "reason": exc.answer.reason},
            )
            return f"detach {device_id}: {exc.answer.reason}"
        log.info(kv("detached", vm=self.name, id=device_id, reason="removed from the config"))
        self._detached.add(device_id)
        return f"{device_id}: waiting for the guest to eject it"

    def _detaching(self, info: VmInfo) -> list[str]:
        """Keep looking while a pruned device awaits its eject, so that its virtiofsd is
        released (on_observed) as soon as the guest has let go of it."""
        self._detached &= info.device_tree_ids - {device.id for device in info.fs}
        return [f"{device_id}: waiting for the guest to eject it" for device_id in self._detached]

    # ---- status bookkeeping ---------------------------------------------

    def _set(self, status: ShareStatus, state: ShareState, detail: str, fix: str = "") -> None:
        if status.state is not state:
            status.since = time.time()
            if state is not ShareState.RETRYING:
                status.attempt = 0
        status.state, status.detail, status.fix = state, detail, fix
        if state not in (ShareState.RETRYING, ShareState.WAITING_EJECT):
            status.next_try_at = None

    def _set_for(self, share: Share, state: ShareState, detail: str, fix: str = "") -> None:
        self._set(self.status.shares[share.tag], state, detail, fix)
        if state is ShareState.WAITING_BACKEND:
            self._note_failure(share, "waiting for backend", detail, logging.INFO)

    def _attached(self, share: Share, *, already: bool, **fields: object) -> None:
        status = self.status.shares[share.tag]
        was = status.state
        self._set(status, ShareState.ATTACHED, "")
        self._eject_waiting_since.pop(share.device_id, None)
        self._throttle.clear(f"{self.name}/{share.tag}")
        if not already:
            log.info(kv("attached", vm=self.name, tag=share.tag, id=share.device_id, **fields))
        elif was is not ShareState.ATTACHED:
            log.info(kv("already attached", vm=self.name, tag=share.tag, id=share.device_id))

    def _retrying(self, share: Share, reason: str) -> str:
        self._set_for(share, ShareState.RETRYING, reason)
        self._note_failure(share, "attach retrying", reason, logging.WARNING)
        return f"{share.tag}: {reason}"

    def _waiting_eject(self, share: Share) -> str:
        now = time.monotonic()
        since = self._eject_waiting_since.setdefault(share.device_id, now)
        detail = f"waiting for the guest to eject {share.device_id}"
        if now - since >= EJECT_PATIENCE:
            # The same words every time, so the throttle holds the repeats back.
            question = "does the guest support ACPI PCI hotplug and is it running (not paused)?"
            self._note_failure(share, "eject overdue", f"{detail}; {question}", logging.WARNING)
            detail += f" for {now - since:.0f}s; {question}"
        self._set_for(share, ShareState.WAITING_EJECT, detail)
        return f"{share.tag}: {detail}"

    def _note_failure(self, share: Share, event: str, reason: str, level: int) -> None:
        fields: dict[str, object] = {
            "vm": self.name,
            "tag": share.tag,
            "id": share.device_id,
            "socket": share.socket,
            "attempt": self.status.shares[share.tag].attempt or None,
            "reason": reason,
        }
        self._log_throttled(f"{self.name}/{share.tag}", level, event, fields)

    def _log_throttled(
        self, key: str, level: int, event: str, fields: Mapping[str, object]
    ) -> None:
        """The first of a run of identical failures, then at most one a minute (logs.py)."""
        held_back = self._throttle.admit_event(key, event, fields.get("reason"), time.monotonic())
        if held_back is not None:
            log.log(level, kv(event, **fields, repeated=held_back or None))

    def _mark_all_pending_retrying(self, reason: str) -> None:
        for share in self.shares:
            status = self.status.shares[share.tag]
            if status.state is not ShareState.ATTACHED and share.device_id not in self._blocked:
                self._retrying(share, reason)

    def _unreachable(self, exc: BaseException) -> None:
        reason = str(exc) or type(exc).__name__
        if isinstance(exc, TimeoutError):
            reason = "CH did not answer in time (busy connecting a backend, or hung)"
        elif isinstance(exc, PermissionError):
            reason = (
                f"permission denied on {self.status.api_socket}: CH's socket is mode 0600;"
                " run the daemon as CH's user or root, or grant CAP_DAC_OVERRIDE (README)"
            )
        elif isinstance(exc, ConnectionError):
            reason = "CH closed the connection without answering"
        if not self._reported_unreachable:  # once; the shares say the rest
            self._reported_unreachable = True
            log.warning(kv("CH not answering", vm=self.name, reason=reason))
        self.status.socket = SocketState.UNREACHABLE
        self.status.detail = reason
        self._mark_all_pending_retrying(reason)

    def _forget_shares(self, why: str) -> None:
        """What we knew about the shares belonged to a CH process that is gone."""
        self._pid = None
        for status in self.status.shares.values():
            self._set(status, ShareState.PENDING, why)

    def _gone(self) -> None:
        self.status.socket = SocketState.ABSENT
        self.status.ch_pid = None
        self.status.vm_state = None
        self.status.detail = "no API socket: the VM is not running"
        self._forget_shares("VM not running")

    def _stale(self) -> None:
        if self.status.socket is not SocketState.STALE:
            log.info(
                kv(
                    "api socket is stale",
                    vm=self.name,
                    socket=self.status.api_socket,
                    reason="connection refused: no CH listens; waiting for it to be recreated",
                )
            )
            # Its CH is gone (a SIGKILL leaves the socket, §6), and with it every device.
            self._on_stale(self.name)
        self.status.socket = SocketState.STALE
        self.status.ch_pid = None
        self.status.vm_state = None
        self.status.detail = "CH is not running (nothing listens on the API socket)"
        self._forget_shares("VM not running")
        self._on_change()

    def _not_ch(self, reason: str) -> None:
        if self.status.socket is not SocketState.NOT_CH:
            log.error(
                kv(
                    "backend does not support fs attach",
                    vm=self.name,
                    socket=self.status.api_socket,
                    reason=reason,
                )
            )
        self.status.socket = SocketState.NOT_CH
        self.status.detail = f"backend does not support fs attach: {reason}"
        for share in self.shares:
            self._set_for(
                share,
                ShareState.FAILED,
                self.status.detail,
                fix="point [watch] api_socket at Cloud Hypervisor API sockets",
            )
        self._on_change()
