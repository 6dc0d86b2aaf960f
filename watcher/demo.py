"""`virtiofs-reattach demo`: the daemon's main job, end to end, on a machine with no CH.

Everything is real except Cloud Hypervisor itself: two CH test doubles (the
project's own, `watcher.testing.chdouble`) and stand-in virtiofsd processes
in a temp folder, the real daemon as a child process (`run -c`), real inotify.
One VM's CH is killed with SIGKILL (a crash leaves its socket behind) and
started again on the same path, and the demo reports what the daemon did.

The re-attach latency is measured from the new API socket's creation, seen by
inotify in this process (CH binds and listens back to back), to the moment
the double finished answering the last add-fs; both ends use CLOCK_MONOTONIC,
which is one clock for all processes on Linux.
"""

from __future__ import annotations

import asyncio
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .inotify import FsEvent, FsEventKind, InotifyWatcher
from .testing.processes import BackendProcess, DaemonProcess, DoubleProcess

VMS = {"web01": ["data", "logs"], "db01": ["data"]}
WAIT = 60.0


def say(text: str) -> None:
    print(text, flush=True)


class Demo:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.ch_dir = root / "ch"
        self.vfs_dir = root / "vfs"
        self.share_dir = root / "share"
        for folder in (self.ch_dir, self.vfs_dir, self.share_dir):
            folder.mkdir()
        self.config = root / "mounts.toml"
        self.doubles: dict[str, DoubleProcess] = {}
        self.children: list[BackendProcess | DoubleProcess] = []
        self.created_at: dict[str, float] = {}
        self.daemon: DaemonProcess | None = None

    def write_config(self) -> None:
        lines = ["[watch]", f'api_socket = "{self.ch_dir}/{{vm}}.sock"', ""]
        # Its own runtime_dir: the daemon lock (daemonlock.py) stays in the temp folder, and a
        # service running on this host does not stop the demo.
        lines += ["[backend]", f'runtime_dir = "{self.root}/run"', ""]
        for vm, tags in VMS.items():
            shares = ", ".join(
                f'{{ tag = "{tag}", socket = "{self.backend(vm, tag)}" }}' for tag in tags
            )
            lines += [f"[vm.{vm}]", f"fs = [{shares}]", ""]
        self.config.write_text("\n".join(lines))

    def backend(self, vm: str, tag: str) -> str:
        return str(self.vfs_dir / f"{vm}-{tag}.sock")

    async def start_vm(self, vm: str) -> DoubleProcess:
        """Backends first, then CH: what a VM manager does when it starts a VM."""
        for tag in VMS[vm]:
            self.children.append(
                await BackendProcess.fake(self.backend(vm, tag), str(self.share_dir))
            )
        double = await DoubleProcess.start(
            str(self.ch_dir / f"{vm}.sock"), str(self.root / f"{vm}.ctl")
        )
        self.children.append(double)
        self.doubles[vm] = double
        return double

    async def attached(self, vm: str) -> set[str]:
        info: dict[str, Any] | None = await self.doubles[vm].call("info")
        if not info:
            return set()
        return {fs["id"] for fs in (info["config"].get("fs") or [])}

    async def wait_all_attached(self, vm: str) -> None:
        wanted = {f"cocoon-fs-{tag}" for tag in VMS[vm]}
        deadline = time.monotonic() + WAIT
        while not wanted <= await self.attached(vm):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{vm}: shares not attached within {WAIT:g}s")
            await asyncio.sleep(0.01)

    def on_fs_event(self, event: FsEvent) -> None:
        if event.kind is FsEventKind.CREATED and event.is_socket:
            self.created_at[event.path] = time.monotonic()

    async def run(self) -> bool:
        self.write_config()
        watcher = InotifyWatcher(self.on_fs_event)
        watcher.start(asyncio.get_running_loop())
        watcher.watch(str(self.ch_dir))
        try:
            return await self._story()
        finally:
            watcher.close()
            await self.cleanup()

    async def _story(self) -> bool:
        say(f"virtiofs-reattach demo in {self.root}")
        say("[1/4] starting two simulated CH VMs and their virtiofsd backends:")
        for vm, tags in VMS.items():
            await self.start_vm(vm)
            say(f"      {vm}: shares {', '.join(tags)}")
        say(f"[2/4] starting the daemon: virtiofs-reattach run -c {self.config}")
        self.daemon = await DaemonProcess(
            self.config,
            {"VIRTIOFS_REATTACH_STATE": str(self.root / "state.json")},
            on_line=lambda line: say(f"      daemon | {line}"),
        ).start()
        for vm in VMS:
            await self.wait_all_attached(vm)
        say("[3/4] killing web01's CH with SIGKILL and starting it again on the same socket path")
        old = self.doubles["web01"]
        await old.kill()
        socket_path = str(self.ch_dir / "web01.sock")
        self.created_at.pop(socket_path, None)
        new = await self.start_vm("web01")
        await self.wait_all_attached("web01")
        say("[4/4] what happened:")
        return await self._report(new, old, socket_path)

    async def _report(self, new: DoubleProcess, old: DoubleProcess, socket_path: str) -> bool:
        ok = True
        adds = await new.requests("/api/v1/vm.add-fs")
        ids = sorted(r["body"]["id"] for r in adds)
        last_answer = max(r["finished_at"] for r in adds)
        listening = self.created_at.get(socket_path)
        latency = (
            f"{(last_answer - listening) * 1000:.0f} ms"
            if listening is not None
            else "unknown (socket creation not seen)"
        )
        say(
            f"      web01: new CH pid {new.ch_pid} (was {old.ch_pid}); re-attached {', '.join(ids)}"
            f" in {latency} (API socket listening -> last add-fs answered)"
        )
        expected = sorted(f"cocoon-fs-{tag}" for tag in VMS["web01"])
        if ids != expected:
            say(f"      web01: expected exactly one add-fs per share {expected}, saw {ids}")
            ok = False
        db_adds = await self.doubles["db01"].requests("/api/v1/vm.add-fs")
        say(f"      db01: untouched, {len(db_adds)} add-fs in total (one per share)")
        ok &= len(db_adds) == len(VMS["db01"])
        say("demo " + ("succeeded" if ok else "FAILED"))
        return ok

    async def cleanup(self) -> None:
        if self.daemon is not None:
            await self.daemon.stop()
        for child in self.children:
            await child.kill()


def run_demo() -> int:
    root = Path(tempfile.mkdtemp(prefix="vr-demo-", dir="/tmp"))
    try:
        ok = asyncio.run(Demo(root).run())
    except (TimeoutError, OSError, RuntimeError, EOFError) as exc:
        print(f"demo failed: {exc}", file=sys.stderr)
        ok = False
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0 if ok else 1
