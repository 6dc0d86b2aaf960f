"""VmWorker details that end-to-end tests cannot pin down reliably."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace

import pytest
from tenacity import RetryCallState

from watcher import chclient
from watcher.chclient import AddFsResult, ChClient
from watcher.config import RetrySettings, Share
from watcher.reconciler import EJECT_PATIENCE, EJECT_POLL, VmSettings, VmWorker
from watcher.state import ShareState
from watcher.testing.chdouble import CloudHypervisorDouble


def data_share(socket: str) -> Share:
    return Share(
        vm="web01",
        tag="data",
        socket=socket,
        num_queues=1,
        queue_size=1024,
        device_id="cocoon-fs-data",
    )


def worker() -> VmWorker:
    settings = VmSettings(device_id_prefix="cocoon-fs-", prune=False, retry=RetrySettings())
    return VmWorker("web01", "/nonexistent/web01.sock", [], settings)


async def test_a_cancel_that_races_a_poke_still_cancels() -> None:
    """Python 3.11's wait_for swallows a cancel when the awaited event completes
    at the same moment; the daemon cancels a VM's task when its socket goes, and
    that must never be lost."""
    for _ in range(100):
        w = worker()
        task = asyncio.create_task(w._woken_within(30))
        await asyncio.sleep(0)
        w.poke()
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=10)
        assert done == {task}
        assert task.cancelled()


async def test_woken_within_reports_a_poke_and_consumes_it() -> None:
    w = worker()
    w.poke()
    assert await w._woken_within(30) is True
    assert await w._woken_within(0.01) is False


def test_an_overdue_eject_is_logged_once_not_at_every_look(
    caplog: pytest.LogCaptureFixture,
) -> None:
    data = data_share("/run/vfs/data.sock")
    settings = VmSettings(device_id_prefix="cocoon-fs-", prune=False, retry=RetrySettings())
    w = VmWorker("web01", "/nonexistent/web01.sock", [data], settings)
    w._eject_waiting_since[data.device_id] = time.monotonic() - EJECT_PATIENCE - 1
    with caplog.at_level(logging.INFO, logger="watcher.reconciler"):
        for _ in range(5):  # five looks, each five seconds after the one before
            w._waiting_eject(data)
            w._eject_waiting_since[data.device_id] -= 5
    overdue = [r for r in caplog.records if "eject overdue" in r.getMessage()]
    assert len(overdue) == 1
    assert overdue[0].levelno == logging.WARNING
    assert "ACPI PCI hotplug" in overdue[0].getMessage()
    assert "ACPI PCI hotplug" in w.status.shares["data"].detail


# ---- against the in-process CH double ---------------------------------------------------


@pytest.fixture
async def created_vm(short_tmp: Path) -> AsyncIterator[CloudHypervisorDouble]:
    """A VM created, not booted: add-fs only edits its config (204), so no backend is needed."""
    double = CloudHypervisorDouble(str(short_tmp / "api.sock"), vm="created")
    await double.start()
    yield double
    await double.stop(clean=False)


def add_fs_count(double: CloudHypervisorDouble) -> int:
    return sum(r.path == "/api/v1/vm.add-fs" for r in double.requests)


async def test_a_duplicate_id_answer_is_read_as_attached(
    created_vm: CloudHypervisorDouble, short_tmp: Path
) -> None:
    """Someone (Cocoon, a `once`) adds the device between our vm.info and our add-fs."""
    backend = socket.socket(socket.AF_UNIX)
    backend.bind(str(short_tmp / "data.sock"))
    share = data_share(str(short_tmp / "data.sock"))
    settings = VmSettings(device_id_prefix="cocoon-fs-", prune=False, retry=RetrySettings())
    w = VmWorker("web01", created_vm.api_socket, [share], settings)
    ours = w.client.add_fs

    async def someone_else_first(s: Share) -> AddFsResult:
        await ChClient(created_vm.api_socket).add_fs(s)
        return await ours(s)

    w.client.add_fs = someone_else_first  # type: ignore[method-assign,assignment]
    try:
        await w.reconcile(retry=False)
    finally:
        backend.close()
    assert add_fs_count(created_vm) == 2  # theirs, then ours, refused as a duplicate
    assert w.status.shares["data"].state is ShareState.ATTACHED


async def test_an_add_fs_that_times_out_is_not_sent_again_once_ch_shows_it(
    created_vm: CloudHypervisorDouble, short_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A timed-out add-fs may still happen inside CH (§9): look before adding again."""
    monkeypatch.setattr(chclient, "ADD_FS_TIMEOUT", 0.2)
    backend = socket.socket(socket.AF_UNIX)
    backend.bind(str(short_tmp / "data.sock"))
    share = data_share(str(short_tmp / "data.sock"))
    retry = RetrySettings(initial_delay=0.01, max_delay=0.05)
    w = VmWorker("web01", created_vm.api_socket, [share], VmSettings("cocoon-fs-", False, retry))
    ours = w.client.add_fs

    async def while_ch_hangs(s: Share) -> AddFsResult:
        created_vm.set_hung(True)  # CH busy, e.g. connecting another device's backend
        try:
            return await ours(s)
        finally:
            created_vm.set_hung(False)  # the queued add-fs now goes through inside CH

    w.client.add_fs = while_ch_hangs  # type: ignore[method-assign,assignment]
    try:
        async with asyncio.timeout(30):
            await w.reconcile(retry=True)
    finally:
        backend.close()
    assert add_fs_count(created_vm) == 1
    assert w.status.shares["data"].state is ShareState.ATTACHED


def test_add_fs_waits_out_ch_s_60_s_backend_connect() -> None:
    assert chclient.ADD_FS_TIMEOUT >= 75


def test_backoff_doubles_with_jitter_and_stays_under_max_delay() -> None:
    retry = RetrySettings(initial_delay=0.2, max_delay=30.0)
    w = VmWorker("web01", "/nonexistent", [], VmSettings("cocoon-fs-", False, retry))
    waits = [w._wait(attempt(n)) for n in range(1, 40)]
    assert 0.2 <= waits[0] <= 0.4
    assert 0.4 <= waits[1] <= 0.6
    assert max(waits) == 30.0
    assert all(0 < wait <= 30.0 for wait in waits)


def attempt(number: int) -> RetryCallState:
    state: RetryCallState = SimpleNamespace(attempt_number=number)  # type: ignore[assignment]
    return state


def test_waiting_for_an_eject_looks_again_often() -> None:
    """The guest's eject raises no event we see; the share is gone from it until re-added."""
    retry = RetrySettings(initial_delay=0.2, max_delay=30.0)
    w = VmWorker(
        "web01", "/nonexistent", [data_share("/s")], VmSettings("cocoon-fs-", False, retry)
    )
    assert w._wait(attempt(10)) == 30.0
    w.status.shares["data"].state = ShareState.WAITING_EJECT
    assert w._wait(attempt(10)) == EJECT_POLL
