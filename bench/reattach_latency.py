"""Re-attach latency: CH's new API socket listening → the last add-fs answered.

Usage: python bench/reattach_latency.py [ROUNDS] [SHARES]

Runs the real daemon (`python -m watcher run`) against a CH double process
and stand-in virtiofsd processes, kills the double with SIGKILL and starts it
again ROUNDS times, and reports the distribution. The start of each
measurement is the API socket's IN_CREATE seen by inotify in this process
(CH binds and listens back to back), the end is the double's own record of
when it finished answering the last add-fs; both are CLOCK_MONOTONIC, one
clock for every process on Linux. A figure, not a test: nothing asserts on it.
"""

from __future__ import annotations

import asyncio
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from watcher.inotify import FsEvent, FsEventKind, InotifyWatcher
from watcher.testing.processes import BackendProcess, DaemonProcess, DoubleProcess


async def bench(root: Path, rounds: int, shares: int) -> list[float]:
    ch_dir, vfs_dir, share_dir = root / "ch", root / "vfs", root / "share"
    for folder in (ch_dir, vfs_dir, share_dir):
        folder.mkdir()
    tags = [f"s{i}" for i in range(shares)]
    config = root / "mounts.toml"
    fs = ", ".join(f'{{ tag = "{t}", socket = "{vfs_dir}/{t}.sock" }}' for t in tags)
    config.write_text(
        f'[watch]\napi_socket = "{ch_dir}/{{vm}}.sock"\n'
        f'[backend]\nruntime_dir = "{root}/run"\n'  # its own daemon lock, not the service's
        f"[vm.bench]\nfs = [{fs}]\n"
    )
    api_socket = str(ch_dir / "bench.sock")
    created: dict[str, float] = {}

    def on_event(event: FsEvent) -> None:
        if event.kind is FsEventKind.CREATED and event.path == api_socket:
            created["at"] = time.monotonic()

    watcher = InotifyWatcher(on_event)
    watcher.start(asyncio.get_running_loop())
    watcher.watch(str(ch_dir))
    daemon = await DaemonProcess(config, {"VIRTIOFS_REATTACH_STATE": str(root / "s.json")}).start()
    children: list[BackendProcess | DoubleProcess] = []
    results: list[float] = []
    try:
        for _ in range(rounds):
            for tag in tags:
                children.append(await BackendProcess.fake(f"{vfs_dir}/{tag}.sock", str(share_dir)))
            created.clear()
            double = await DoubleProcess.start(api_socket, str(root / "ctl.sock"))
            children.append(double)
            deadline = time.monotonic() + 60
            while len(adds := await double.requests("/api/v1/vm.add-fs")) < shares or any(
                r["finished_at"] is None for r in adds
            ):
                if time.monotonic() > deadline:
                    raise TimeoutError("shares not attached within 60 s")
                await asyncio.sleep(0.005)
            results.append(max(r["finished_at"] for r in adds) - created["at"])
            await double.kill()
    finally:
        watcher.close()
        await daemon.stop()
        for child in children:
            await child.kill()
    return results


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 20
    shares = int(sys.argv[2]) if len(sys.argv) > 2 else 2
    root = Path(tempfile.mkdtemp(prefix="vr-bench-", dir="/tmp"))
    try:
        results = asyncio.run(bench(root, rounds, shares))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    ms = sorted(r * 1000 for r in results)
    p95 = ms[min(len(ms) - 1, int(len(ms) * 0.95))]
    print(
        f"re-attach latency, {rounds} CH restarts x {shares} shares: "
        f"min {ms[0]:.1f} ms, median {statistics.median(ms):.1f} ms, "
        f"p95 {p95:.1f} ms, max {ms[-1]:.1f} ms"
    )


if __name__ == "__main__":
    main()
