"""Managed backends end to end: the daemon runs a real virtiofsd per share.

The CH double does a real vhost-user handshake with Debian 12's legacy
virtiofsd (/usr/lib/qemu/virtiofsd), which serves one connection and exits
when the double disconnects at each guest reboot, exactly as CH and virtiofsd
behave (cloud-hypervisor-api.md §6-§7, virtiofsd.md §2). Every test ends by
checking that no virtiofsd of its own is left running.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.support import Host, eventually, includes
from tests.test_e2e import add_fs_ids, wait_attached
from watcher.backends_share import MISSING_DIR_FIX

VIRTIOFSD = "/usr/lib/qemu/virtiofsd"
INFO = "/api/v1/vm.info"
REMOVE = "/api/v1/vm.remove-device"

pytestmark = pytest.mark.skipif(
    not os.access(VIRTIOFSD, os.X_OK),
    reason="needs Debian's qemu-system-common (tests/run installs it)",
)


def virtiofsd_pids(root: Path, *, workers: bool = False) -> list[int]:
    """virtiofsd processes whose command line names this test's folder.

    The legacy virtiofsd's namespace sandbox forks a worker with the same
    command line; it is left out unless `workers` (it dies with its parent)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if argv and argv[0].endswith(b"virtiofsd") and str(root).encode() in b" ".join(argv):
            found.append(int(entry))
    if workers:
        return found
    return [pid for pid in found if _parent(pid) not in found]


def _parent(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def open_files(pid: int) -> set[str]:
    """What the process's descriptors point to."""
    found = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):  # closed meanwhile
            found.add(os.readlink(f"/proc/{pid}/fd/{fd}"))
    return found


@pytest.fixture
async def managed_host(host: Host) -> AsyncIterator[Host]:
    """The host, and afterwards no virtiofsd of this test left running.

    A stopped daemon leaves its virtiofsd processes running by design (a VM
    may connect meanwhile; the next daemon adopts them), so the test stops
    them itself, like an operator taking the host down, and checks they stay
    gone (no sandbox child survives, nothing restarts them)."""
    yield host
    await host.cleanup()
    for pid in virtiofsd_pids(host.root, workers=True):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    await eventually(lambda: virtiofsd_pids(host.root, workers=True) == [], "every virtiofsd gone")


def backend_of(host: Host, vm: str, tag: str) -> Any:
    """The share's `backend` object in the daemon's state file; "absent" before it is written."""
    return host.share_doc(vm, tag).get("backend", "absent")


async def test_status_shows_each_managed_share_s_virtiofsd(managed_host: Host) -> None:
    host = managed_host
    data = host.root / "export"
    data.mkdir()
    host.write_config({"web01": ["ext"]}, managed={"web01": [("data", str(data))]})
    await host.start_backend("web01", "ext")
    await host.start_daemon()
    await eventually(lambda: len(virtiofsd_pids(host.root)) == 1, "virtiofsd started")
    (pid,) = virtiofsd_pids(host.root)
    listening = {"state": "listening", "pid": pid, "restarts": 0, "last_error": None, "fix": None}
    await eventually(lambda: backend_of(host, "web01", "data") == listening, "listening, VM off")
    assert backend_of(host, "web01", "ext") is None  # its virtiofsd is not ours to report

    double = await host.start_double("web01")
    await wait_attached(double, "cocoon-fs-data", "cocoon-fs-ext")
    serving = {**listening, "state": "serving"}
    await eventually(lambda: backend_of(host, "web01", "data") == serving, "serving its VM")
    shown = subprocess.run(
        [sys.executable, "-m", "watcher", "status", "--state-file", str(host.state)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.splitlines().count(f"web01        virtiofsd: serving pid {pid}") == 1


async def test_managed_share_is_attached_and_survives_20_guest_reboots(managed_host: Host) -> None:
    host = managed_host
    data = host.root / "export"
    data.mkdir()
    host.write_config({}, managed={"web01": [("data", str(data))]})
    daemon = await host.start_daemon()
    await daemon.wait_for("ready ")  # READY=1 comes after start = "always" started them
    assert len(virtiofsd_pids(host.root)) == 1, "virtiofsd started before the VM"
    double = await host.start_double("web01")
    await wait_attached(double, "cocoon-fs-data")
    await daemon.wait_for(r"attached vm=web01 tag=data")
    assert await double.call("backends") == ["cocoon-fs-data"]
    for n in range(20):
        assert await double.call("guest-reboot") is True, f"reboot {n + 1} failed"
        assert await double.call("backends") == ["cocoon-fs-data"], f"after reboot {n + 1}"
    assert await add_fs_ids(double) == ["cocoon-fs-data"]  # reboots keep hot-added devices


async def test_vm_process_restart_reattaches_the_managed_share(managed_host: Host) -> None:
    host = managed_host
    data = host.root / "export"
    data.mkdir()
    host.write_config({}, managed={"web01": [("data", str(data))]})
    await host.start_daemon()
    first = await host.start_double("web01")
    await wait_attached(first, "cocoon-fs-data")
    await first.kill()
    second = await host.start_double("web01")
    await wait_attached(second, "cocoon-fs-data")
    await eventually(
        lambda: includes(second.call("backends"), "cocoon-fs-data"), "new CH connected to virtiofsd"
    )


async def test_killing_virtiofsd_by_hand_brings_a_new_one_up(managed_host: Host) -> None:
    host = managed_host
    data = host.root / "export"
    data.mkdir()
    host.write_config({}, managed={"web01": [("data", str(data))]})
    daemon = await host.start_daemon()
    await eventually(lambda: len(virtiofsd_pids(host.root)) == 1, "virtiofsd running")
    (old,) = virtiofsd_pids(host.root)
    os.kill(old, signal.SIGKILL)
    await eventually(
        lambda: len(pids := virtiofsd_pids(host.root)) == 1 and pids[0] != old,
        "a new virtiofsd",
    )
    double = await host.start_double("web01")
    await wait_attached(double, "cocoon-fs-data")
    assert daemon.proc.returncode is None


async def test_crash_looping_backend_backs_off_and_says_why(managed_host: Host) -> None:
    host = managed_host
    missing = host.root / "no-such-folder"
    host.write_config({}, managed={"web01": [("data", str(missing))]})
    double = await host.start_double("web01")
    daemon = await host.start_daemon()
    line = await daemon.wait_for(r"virtiofsd failed .*vm=web01|vm=web01 .*virtiofsd failed")
    assert "no-such-folder" in line or "source" in line
    await eventually(
        lambda: host.share_state("web01", "data") == "waiting-backend", "waiting in status"
    )
    assert await add_fs_ids(double) == []  # never add-fs onto a backend that cannot serve
    assert len(daemon.matching(r"virtiofsd failed")) == 1  # said once, not once per attempt
    assert 'fix="create the folder or fix shared_dir in the config"' in line
    await eventually(
        lambda: backend_of(host, "web01", "data")["fix"] == MISSING_DIR_FIX, "the fix in status"
    )
    await eventually(
        lambda: host.share_doc("web01", "data").get("fix") == MISSING_DIR_FIX, "share's fix"
    )
    missing.mkdir()
    await wait_attached(double, "cocoon-fs-data")
    recovered = await daemon.wait_for(r"virtiofsd recovered vm=web01 tag=data pid=\d+")
    assert len(daemon.matching(r"virtiofsd recovered")) == 1
    await eventually(lambda: backend_of(host, "web01", "data")["fix"] is None, "fix cleared")
    backend = backend_of(host, "web01", "data")
    assert f"pid={backend['pid']}" in recovered
    assert "no-such-folder" in backend["last_error"]  # kept: what the problem was


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL], ids=["stopped", "crashed"])
async def test_daemon_restart_keeps_the_live_connection(
    managed_host: Host, how: signal.Signals
) -> None:
    """Also when the daemon crashes: its virtiofsd are neither killed nor left unsupervised,
    the next daemon adopts them."""
    host = managed_host
    data = host.root / "export"
    data.mkdir()
    host.write_config({}, managed={"web01": [("data", str(data))]})
    first = await host.start_daemon()
    double = await host.start_double("web01")
    await wait_attached(double, "cocoon-fs-data")
    (serving,) = virtiofsd_pids(host.root)
    assert await first.stop(how) == (0 if how is signal.SIGTERM else -signal.SIGKILL)
    assert virtiofsd_pids(host.root) == [serving]  # not killed with the daemon
    # Nor holding the daemon lock (daemonlock.py), which would keep the next daemon out.
    lock = str(host.root / "run" / ".daemon.lock")
    assert all(lock not in open_files(pid) for pid in virtiofsd_pids(host.root, workers=True))
    second = await host.start_daemon()
    await second.wait_for(r"adopted virtiofsd left by the previous daemon .*vm=web01")
    await second.wait_for(r"already attached vm=web01 tag=data")
    assert await double.call("backends") == ["cocoon-fs-data"]  # connection never cut
    assert await add_fs_ids(double) == ["cocoon-fs-data"]
    # The adopted virtiofsd ends with the next reboot; the new daemon serves the reconnect.
    assert await double.call("guest-reboot") is True
    assert await double.call("backends") == ["cocoon-fs-data"]


async def test_pruned_managed_share_is_detached_then_its_virtiofsd_stopped(
    managed_host: Host,
) -> None:
    """Only after the guest's eject: until then CH keeps the device's vhost-user
    connection, and CH <= v51 exits altogether when that backend dies (§5, §7)."""
    host = managed_host
    data = host.root / "export"
    data.mkdir()
    host.write_config({}, extra="prune = true", managed={"web01": [("data", str(data))]})
    daemon = await host.start_daemon()
    double = await host.start_double("web01", "--profile", "v47", "--eject", "manual")
    await wait_attached(double, "cocoon-fs-data")
    serving = virtiofsd_pids(host.root)
    host.write_config({"web01": []}, extra="prune = true")
    await daemon.wait_for(r"detached vm=web01 id=cocoon-fs-data")

    async def looked_twice_since_the_remove() -> bool:
        records = await double.requests()
        removed = [r["received_at"] for r in records if r["path"] == REMOVE]
        return (
            bool(removed)
            and sum(r["path"] == INFO and r["received_at"] > removed[0] for r in records) >= 2
        )

    await eventually(looked_twice_since_the_remove, "the daemon waits for the eject")
    assert virtiofsd_pids(host.root) == serving
    assert daemon.matching(r"virtiofsd released") == []
    await double.call("eject", id="cocoon-fs-data")
    await daemon.wait_for(r"virtiofsd released vm=web01 tag=data")
    await eventually(lambda: virtiofsd_pids(host.root) == [], "its virtiofsd stopped")
    assert not os.path.exists(host.managed_socket("web01", "data"))
    assert await double.call("state") == "Running"  # CH lived through it


@pytest.mark.parametrize("killed", [False, True], ids=["ch-exits", "ch-is-killed"])
async def test_on_demand_runs_virtiofsd_while_the_vm_runs(managed_host: Host, killed: bool) -> None:
    """Also when CH is SIGKILLed: it leaves its API socket behind (§6), and a stale socket
    means the VM is gone as much as a deleted one."""
    host = managed_host
    data = host.root / "export"
    data.mkdir()
    host.write_config(
        {}, backend_extra='start = "on-demand"', managed={"web01": [("data", str(data))]}
    )
    daemon = await host.start_daemon()
    await daemon.wait_for("ready ")
    assert virtiofsd_pids(host.root) == []  # no VM, no virtiofsd
    double = await host.start_double("web01")
    await wait_attached(double, "cocoon-fs-data")
    assert len(virtiofsd_pids(host.root)) == 1
    if killed:
        await double.kill()
        await daemon.wait_for("api socket is stale vm=web01")
    else:
        await double.stop()  # clean CH exit: the API socket goes away
    await eventually(lambda: virtiofsd_pids(host.root) == [], "virtiofsd stopped with the VM")


async def test_switching_to_on_demand_stops_the_left_over_virtiofsd_of_stopped_vms(
    managed_host: Host,
) -> None:
    host = managed_host
    data = host.root / "export"
    data.mkdir()
    host.write_config({}, managed={"web01": [("data", str(data))], "db": [("data", str(data))]})
    first = await host.start_daemon()
    await eventually(lambda: len(virtiofsd_pids(host.root)) == 2, "start = always: both run")
    double = await host.start_double("db")
    await wait_attached(double, "cocoon-fs-data")
    assert await first.stop() == 0  # leaves both running, by design

    host.write_config(
        {},
        backend_extra='start = "on-demand"',
        managed={"web01": [("data", str(data))], "db": [("data", str(data))]},
    )
    second = await host.start_daemon()
    await second.wait_for("virtiofsd stopped vm=web01 tag=data")  # its VM is not running
    await second.wait_for("adopted virtiofsd left by the previous daemon vm=db tag=data")
    assert len(virtiofsd_pids(host.root)) == 1
    assert await double.call("guest-reboot") is True  # db's is still supervised
    await double.stop()
    await eventually(lambda: virtiofsd_pids(host.root) == [], "db's stopped with its VM")


async def test_a_socket_path_in_the_way_fails_visibly_and_a_reload_retries(
    managed_host: Host,
) -> None:
    host = managed_host
    data = host.root / "export"
    data.mkdir()
    blocker = Path(host.managed_socket("web01", "data"))
    blocker.mkdir(parents=True)  # a folder where the socket goes
    host.write_config({}, managed={"web01": [("data", str(data))]})
    daemon = await host.start_daemon()
    await daemon.wait_for("backend failed vm=web01 tag=data .*exists and is not a socket")
    await eventually(lambda: backend_of(host, "web01", "data")["state"] == "failed", "failed")
    assert "is not a socket" in backend_of(host, "web01", "data")["last_error"]
    blocker.rmdir()
    daemon.proc.send_signal(signal.SIGHUP)
    await eventually(lambda: len(virtiofsd_pids(host.root)) == 1, "started after the reload")
    await eventually(lambda: backend_of(host, "web01", "data")["state"] == "listening", "ok")
    assert len(daemon.matching("backend failed")) == 1
