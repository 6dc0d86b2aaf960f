"""VmWorker details that end-to-end tests cannot pin down reliably."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from watcher.config import RetrySettings, Share
from watcher.reconciler import EJECT_PATIENCE, VmSettings, VmWorker


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
    data = Share(
        vm="web01",
        tag="data",
        socket="/run/vfs/data.sock",
        num_queues=1,
        queue_size=1024,
        device_id="cocoon-fs-data",
    )
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
