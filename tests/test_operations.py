"""Operating the daemon as a service: live config edits, status, sd_notify, journald.

The daemon runs as a subprocess with a fake NOTIFY_SOCKET (a datagram socket
this test binds) and, where the log format is under test, with stderr going
to a file whose device:inode is passed as JOURNAL_STREAM, as systemd does.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.support import Host, eventually
from tests.test_e2e import add_fs_ids, attached_ids, wait_attached
from watcher import unixhttp


class NotifySocket:
    """A datagram socket standing in for systemd's NOTIFY_SOCKET.

    Read as datagrams arrive, like systemd does: the daemon drops a message rather than
    block when the queue is full (net.unix.max_dgram_qlen may be as low as 10)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setblocking(False)
        self.messages: list[dict[str, str]] = []
        asyncio.get_running_loop().add_reader(self.sock.fileno(), self.drain)

    def close(self) -> None:
        asyncio.get_running_loop().remove_reader(self.sock.fileno())
        self.sock.close()

    def drain(self) -> list[dict[str, str]]:
        while True:
            try:
                data = self.sock.recv(65536)
            except BlockingIOError:
                return self.messages
            fields = dict(line.split("=", 1) for line in data.decode().split("\n") if line)
            self.messages.append(fields)

    def seen(self, key: str, value: str | None = None) -> bool:
        return any(key in m and (value is None or m[key] == value) for m in self.drain())


@pytest.fixture
async def notify(host: Host) -> AsyncIterator[NotifySocket]:
    sock = NotifySocket(host.root / "notify.sock")
    yield sock
    sock.close()


def edit_in_place(path: Path, text: str) -> None:
    with open(path, "r+") as f:
        f.truncate(0)
        f.write(text)


def edit_like_sed(path: Path, text: str) -> None:
    """sed -i writes a temp file in the same folder and renames it over the original."""
    tmp = path.parent / f"sed{os.getpid()}"
    tmp.write_text(text)
    os.rename(tmp, path)


async def test_ready_after_first_scan_then_edits_apply_three_times_each_way(
    host: Host, notify: NotifySocket
) -> None:
    host.write_config({"web01": ["a"]})
    double = await host.start_double("web01")
    for tag in ("a", "b", "c", "d", "e", "f", "g", "h", "i", "j"):
        await host.start_backend("web01", tag)
    daemon = await host.start_daemon({"NOTIFY_SOCKET": str(notify.path)})
    await eventually(lambda: notify.seen("READY", "1"), "READY=1")
    await wait_attached(double, "cocoon-fs-a")
    tags = ["a"]
    edits = [
        ("in-place write", edit_in_place),
        (
            "rename",
            lambda p, t: (p.with_suffix(".new").write_text(t), p.with_suffix(".new").rename(p)),
        ),
        ("sed -i", edit_like_sed),
    ]
    letters = iter("bcdefghij")
    for _round in range(3):
        for _how, edit in edits:
            tags.append(next(letters))
            edit(host.config, host.config_text({"web01": tags}))  # the one write of this edit
            await wait_attached(double, *(f"cocoon-fs-{t}" for t in tags))
    assert sorted(await add_fs_ids(double)) == sorted(f"cocoon-fs-{t}" for t in tags)

    def reloads_each_end_with_ready() -> bool:
        """Under Type=notify-reload, `systemctl reload` waits for that READY=1."""
        messages = notify.drain()
        starts = [i for i, m in enumerate(messages) if m.get("RELOADING") == "1"]
        ends = [*starts[1:], len(messages)]
        return len(starts) >= 9 and all(
            any(m.get("READY") == "1" for m in messages[start + 1 : end])
            for start, end in zip(starts, ends, strict=True)
        )

    await eventually(reloads_each_end_with_ready, "READY=1 after every RELOADING=1")
    assert all("MONOTONIC_USEC" in m for m in notify.drain() if m.get("RELOADING") == "1")
    await daemon.stop()
    assert notify.seen("STOPPING", "1")


async def test_drop_in_adds_a_vm_and_sighup_reloads(host: Host) -> None:
    host.write_config({"web01": ["data"]})
    await host.start_backend("web01", "data")
    await host.start_backend("web02", "data")
    await host.start_double("web01")
    web02 = await host.start_double("web02")
    daemon = await host.start_daemon()
    await daemon.wait_for("attached vm=web01")
    drop_in_dir = host.root / "mounts.d"
    drop_in_dir.mkdir()
    socket_path = host.backend_socket("web02", "data")
    (drop_in_dir / "web02.toml").write_text(
        f'[vm.web02]\nfs = [{{ tag = "data", socket = "{socket_path}" }}]\n'
    )
    await wait_attached(web02, "cocoon-fs-data")
    daemon.proc.send_signal(signal.SIGHUP)
    await daemon.wait_for("reload requested reason=SIGHUP")
    await daemon.wait_for("config unchanged")


async def test_invalid_edit_and_deleted_config_keep_the_last_good_one(host: Host) -> None:
    host.write_config({"web01": ["data"]})
    await host.start_backend("web01", "data")
    double = await host.start_double("web01")
    daemon = await host.start_daemon()
    await wait_attached(double, "cocoon-fs-data")
    edit_in_place(host.config, host.config.read_text().replace('tag = "data"', 'tag = "my tag"'))
    line = await daemon.wait_for("config invalid")
    assert "vm.web01.fs[0].tag" in line
    await eventually(lambda: host.status().get("config", {}).get("valid") is False, "invalid")
    status = subprocess.run(
        [sys.executable, "-m", "watcher", "status", "--state-file", str(host.state)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert status.returncode == 1
    assert "invalid" in status.stdout.lower()
    host.config.unlink()
    await daemon.wait_for("does not exist", timeout=30)
    assert await attached_ids(double) == {"cocoon-fs-data"}  # nothing was detached
    assert daemon.proc.returncode is None


async def test_prune_off_reports_prune_on_detaches(host: Host) -> None:
    host.write_config({"web01": ["a", "b"]})
    await host.start_backend("web01", "a")
    await host.start_backend("web01", "b")
    double = await host.start_double("web01", "--eject", "auto")
    daemon = await host.start_daemon()
    await wait_attached(double, "cocoon-fs-a", "cocoon-fs-b")
    host.write_config({"web01": ["a"]})
    await daemon.wait_for("no longer managed vm=web01 id=cocoon-fs-b")
    assert await attached_ids(double) == {"cocoon-fs-a", "cocoon-fs-b"}
    host.write_config({"web01": ["a"]}, extra="prune = true")
    await daemon.wait_for("detached vm=web01 id=cocoon-fs-b")

    async def b_gone() -> bool:
        return await attached_ids(double) == {"cocoon-fs-a"}

    await eventually(b_gone, "cocoon-fs-b detached")


async def test_a_no_longer_managed_device_that_goes_away_leaves_the_status(host: Host) -> None:
    host.write_config({"web01": ["a", "b"]}, retry_extra="resync = 0.2")
    await host.start_backend("web01", "a")
    await host.start_backend("web01", "b")
    double = await host.start_double("web01", "--eject", "auto")
    daemon = await host.start_daemon()
    await wait_attached(double, "cocoon-fs-a", "cocoon-fs-b")
    host.write_config({"web01": ["a"]}, retry_extra="resync = 0.2")
    await daemon.wait_for("no longer managed vm=web01 id=cocoon-fs-b")

    def unmanaged() -> list[str] | None:
        vms = host.status().get("vms", [])
        return vms[0]["unmanaged"] if vms else None

    await eventually(lambda: unmanaged() == ["cocoon-fs-b"], "b listed as no longer managed")
    removed = await unixhttp.request(
        host.api_socket("web01"),
        "PUT",
        "/api/v1/vm.remove-device",
        b'{"id":"cocoon-fs-b"}',
        timeout=10,
    )
    assert removed.status == 204  # an operator detached it by hand
    await eventually(lambda: unmanaged() == [], "b gone from the status")


async def test_changed_socket_replaces_the_device_only_after_the_eject(host: Host) -> None:
    host.write_config({"web01": ["data"]})
    await host.start_backend("web01", "data")
    double = await host.start_double("web01", "--eject", "manual")
    daemon = await host.start_daemon()
    await wait_attached(double, "cocoon-fs-data")
    new_socket = str(host.vfs_dir / "web01-data-v2.sock")
    await host.start_backend_at(new_socket)
    host.write_config({"web01": ["data"]})
    text = host.config.read_text().replace(host.backend_socket("web01", "data"), new_socket)
    edit_in_place(host.config, text)
    await daemon.wait_for("replacing vm=web01 tag=data")
    await eventually(lambda: host.share_state("web01", "data") == "waiting-eject", "waiting")
    adds_before = len(await add_fs_ids(double))
    assert adds_before == 1  # not re-added while the guest has not ejected
    await double.call("eject", id="cocoon-fs-data")

    async def re_added() -> bool:
        info = await double.call("info")
        return any(
            fs["id"] == "cocoon-fs-data" and fs["socket"] == new_socket
            for fs in info["config"].get("fs") or []
        )

    await eventually(re_added, "re-added on the new socket")


async def test_status_json_matches_the_double(host: Host) -> None:
    host.write_config({"web01": ["data", "logs"], "off": ["data"]})
    await host.start_backend("web01", "data")
    double = await host.start_double("web01")
    await host.start_daemon()
    await wait_attached(double, "cocoon-fs-data")
    await eventually(lambda: host.share_state("web01", "logs") == "waiting-backend", "waiting")

    def status() -> tuple[int, dict[str, object]]:
        result = subprocess.run(
            [sys.executable, "-m", "watcher", "status", "--json", "--state-file", str(host.state)],
            capture_output=True,
            text=True,
            check=False,
        )
        return result.returncode, json.loads(result.stdout)

    rc, document = status()
    assert rc == 1  # logs is not attached
    vms = {vm["name"]: vm for vm in document["vms"]}  # type: ignore[attr-defined]
    web01 = vms["web01"]
    assert web01["socket"] == "live"
    assert web01["ch_pid"] == double.ch_pid
    shares = {s["tag"]: s for s in web01["shares"]}
    assert shares["data"]["state"] == "attached"
    assert shares["logs"]["state"] == "waiting-backend"
    assert vms["off"]["socket"] == "absent"
    await host.start_backend("web01", "logs")
    await eventually(lambda: host.share_state("web01", "logs") == "attached", "attached")
    assert status()[0] == 0


async def test_log_lines_carry_priorities_under_journald(host: Host) -> None:
    host.write_config({"web01": ["data"]})
    await host.start_backend("web01", "data")
    await host.start_double("web01", "--no-memory-shared")
    log_file = host.root / "journal.log"
    with open(log_file, "w") as stream:
        st = os.fstat(stream.fileno())
        env = {**os.environ, "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
        env["VIRTIOFS_REATTACH_STATE"] = str(host.state)
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "watcher",
            "run",
            "-c",
            str(host.config),
            stderr=stream,
            env=env,
        )
        try:
            await eventually(lambda: "attach failed" in log_file.read_text(), "error logged")
        finally:
            proc.send_signal(signal.SIGTERM)
            assert await proc.wait() == 0
    lines = log_file.read_text().splitlines()
    assert lines
    assert all(re.match(r"<[0-7]>", line) for line in lines), lines
    assert any(line.startswith("<3>") and "attach failed" in line for line in lines)
    assert any(line.startswith("<6>") and "starting" in line for line in lines)


async def test_a_flapping_share_does_not_flood_the_log(host: Host) -> None:
    host.write_config({"web01": ["data"]})
    await host.start_backend("web01", "data")
    await host.start_double("web01", "--vm", "none")  # every attempt: "VM is not created"
    daemon = await host.start_daemon()

    async def many_attempts() -> bool:
        doc = host.status()
        for vm in doc.get("vms", []):
            for share in vm["shares"]:
                if share["attempt"] >= 8:
                    return True
        return False

    await eventually(many_attempts, "eight attempts")
    assert len(daemon.matching("attach retrying vm=web01 tag=data")) == 1


async def test_watchdog_pings_come_from_the_running_loop(host: Host, notify: NotifySocket) -> None:
    host.write_config({})
    await host.start_daemon({"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "200000"})

    def pings() -> int:
        return sum(1 for m in notify.drain() if m.get("WATCHDOG") == "1")

    await eventually(lambda: pings() >= 3, "three WATCHDOG=1 pings")


async def test_a_changed_api_socket_pattern_rearms_the_watches(host: Host) -> None:
    host.write_config({"web01": ["data"]})
    await host.start_backend("web01", "data")
    daemon = await host.start_daemon()
    await daemon.wait_for("ready ")
    new_root = host.root / "cocoon"
    new_root.mkdir()
    pattern = str(new_root / "{vm}" / "api.sock")
    host.write_config({"web01": ["data"]}, api_socket=pattern)
    await daemon.wait_for("config reloaded")
    (new_root / "web01").mkdir()
    double = await host.start_double("web01", api_socket=str(new_root / "web01" / "api.sock"))
    await wait_attached(double, "cocoon-fs-data")


async def test_ready_is_sent_once_running_vms_were_looked_at(
    host: Host, notify: NotifySocket
) -> None:
    host.write_config({"web01": ["data"], "off": ["data"]})
    await host.start_backend("web01", "data")
    await host.start_double("web01")
    await host.start_daemon({"NOTIFY_SOCKET": str(notify.path)})
    await eventually(lambda: notify.seen("READY", "1"), "READY=1")
    ready = next(m for m in notify.drain() if m.get("READY") == "1")
    assert ready["STATUS"].startswith("1 of 2 VMs running")


async def test_edits_to_a_symlinked_config_are_picked_up(host: Host) -> None:
    real = host.root / "managed-by-tool"
    real.mkdir()
    host.write_config({"web01": ["a"]})
    target = real / "mounts.toml"
    host.config.rename(target)
    host.config.symlink_to(target)
    await host.start_backend("web01", "a")
    await host.start_backend("web01", "b")
    double = await host.start_double("web01")
    await host.start_daemon()
    await wait_attached(double, "cocoon-fs-a")
    text = target.read_text()
    b_socket = host.backend_socket("web01", "b")
    edit_in_place(target, text.replace("fs = [", f'fs = [{{ tag = "b", socket = "{b_socket}" }}, '))
    await wait_attached(double, "cocoon-fs-a", "cocoon-fs-b")


async def test_status_sees_the_daemon_at_once_with_no_vm_running(host: Host) -> None:
    host.write_config({"web01": ["data"]})
    daemon = await host.start_daemon()
    await daemon.wait_for("ready ")
    await eventually(lambda: host.status().get("pid") == daemon.proc.pid, "the state file")
    assert host.status()["vms"][0]["socket"] == "absent"


async def test_a_reload_that_breaks_the_parser_keeps_the_daemon_and_says_why(
    host: Host, notify: NotifySocket
) -> None:
    host.write_config({"web01": ["data"]})
    await host.start_backend("web01", "data")
    double = await host.start_double("web01")
    daemon = await host.start_daemon({"NOTIFY_SOCKET": str(notify.path)})
    await wait_attached(double, "cocoon-fs-data")
    edit_in_place(host.config, "x = " + "[" * 1000 + "]" * 1000 + "\n")  # tomli: RecursionError
    line = await daemon.wait_for("config invalid")
    assert "nested more than" in line
    await daemon.wait_for('reload failed action="keeping the last good config"')
    await eventually(lambda: host.status().get("config", {}).get("valid") is False, "invalid")

    def ready_after_reloading() -> bool:
        messages = notify.drain()
        last = max(i for i, m in enumerate(messages) if m.get("RELOADING") == "1")
        return any(m.get("READY") == "1" for m in messages[last + 1 :])

    await eventually(ready_after_reloading, "READY=1 after the failed reload")
    assert daemon.proc.returncode is None


async def test_a_rescan_rereads_the_config_quietly_when_nothing_changed(
    host: Host, notify: NotifySocket
) -> None:
    """A rescan re-reads the files in case an edit's event was among those lost, but an
    unchanged config is no news (on-demand backends remove folders the daemon watches)."""
    host.write_config({"web01": ["data"]})
    daemon = await host.start_daemon({"NOTIFY_SOCKET": str(notify.path)})
    await eventually(lambda: notify.seen("READY", "1"), "READY=1")
    host.ch_dir.rmdir()  # a watched folder deleted: inotify may have missed something
    await daemon.wait_for("rescanning")
    await eventually(lambda: notify.seen("RELOADING", "1"), "the files re-read")

    def reload_done() -> bool:
        messages = notify.drain()
        last = max(i for i, m in enumerate(messages) if m.get("RELOADING") == "1")
        return any(m.get("READY") == "1" for m in messages[last + 1 :])

    await eventually(reload_done, "READY=1 after the re-read")
    assert daemon.matching("config unchanged") == []
    daemon.proc.send_signal(signal.SIGHUP)  # asked for: said
    await daemon.wait_for("config unchanged")
