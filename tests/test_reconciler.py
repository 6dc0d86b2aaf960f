"""VmWorker details that end-to-end tests cannot pin down reliably."""

from __future__ import annotations

import asyncio

from watcher.config import RetrySettings
from watcher.reconciler import VmSettings, VmWorker


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
