"""End to end: `virtiofs-reattach run` as a subprocess against CH doubles and backends.

Each test drives a real daemon process with real inotify, real unix sockets,
CH doubles started as processes (so SIGKILL leaves a stale socket exactly as
a crashed CH does) and stand-in virtiofsd processes doing a real vhost-user
handshake. Assertions read the double's own request log, the daemon's log
lines and its state file.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
from typing import Any

import pytest

from tests.support import Host, eventually, includes
from watcher import unixhttp
from watcher.testing.processes import BackendProcess, DoubleProcess

ADD_FS = "/api/v1/vm.add-fs"


async def add_fs_ids(double: DoubleProcess) -> list[str]:
    return [r["body"]["id"] for r in await double.requests(ADD_FS)]


async def attached_ids(double: DoubleProcess) -> set[str]:
    info: dict[str, Any] = await double.call("info")
    return {fs["id"] for fs in (info["config"].get("fs") or [])}


async def wait_attached(double: DoubleProcess, *ids: str) -> None:
    async def done() -> bool:
        return set(ids) <= await attached_ids(double)

    await eventually(done, f"{ids} attached")


@pytest.mark.parametrize("profile", ["v47", "v52", "v53", "head"])
async def test_attach_at_start_once_per_share(host: Host, profile: str) -> None:
    host.write_config({"web01": ["data", "logs"]})
    double = await host.start_double("web01", "--profile", profile)
    await host.start_backend("web01", "data")
    await host.start_backend("web01", "logs")
    daemon = await host.start_daemon()
    await daemon.wait_for(r"attached vm=web01 tag=data id=cocoon-fs-data")
    await daemon.wait_for(r"attached vm=web01 tag=logs id=cocoon-fs-logs")
    await wait_attached(double, "cocoon-fs-data", "cocoon-fs-logs")
    assert sorted(await add_fs_ids(double)) == ["cocoon-fs-data", "cocoon-fs-logs"]
    assert sorted(await double.call("backends")) == ["cocoon-fs-data", "cocoon-fs-logs"]
    await eventually(lambda: host.share_state("web01", "logs") == "attached", "state file")
    assert await daemon.stop() == 0


async def test_reattach_after_ch_is_killed_and_restarted(host: Host) -> None:
    host.write_config({"web01": ["data"]})
    first = await host.start_double("web01")
    await host.start_backend("web01", "data")
    daemon = await host.start_daemon()
    await wait_attached(first, "cocoon-fs-data")
    await first.kill()  # like a crash: the socket file stays behind
    assert os.path.exists(host.api_socket("web01"))
    await host.start_backend("web01", "data")  # the old virtiofsd exited with its frontend
    second = await host.start_double("web01")
    await wait_attached(second, "cocoon-fs-data")
    assert await add_fs_ids(second) == ["cocoon-fs-data"]
    await daemon.wait_for(r"attached vm=web01 tag=data", count=2)


async def test_stale_socket_waits_quietly_for_the_next_ch(host: Host) -> None:
    host.write_config({"web01": ["data"]})
    await host.start_backend("web01", "data")
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(host.api_socket("web01"))  # bound, never listening: what a dead CH leaves
    stale.close()
    daemon = await host.start_daemon()
    await daemon.wait_for(r"api socket is stale vm=web01")
    await eventually(
        lambda: any(vm.get("socket") == "stale" for vm in host.status().get("vms", [])),
        "state file says stale",
    )
    # No busy loop while it stays stale: over a second of wall time the daemon uses next to
    # no CPU (a measurement window, not a wait for something to happen).
    before, written = cpu_seconds(daemon.proc.pid), host.status()["updated"]
    await asyncio.sleep(1.0)
    assert cpu_seconds(daemon.proc.pid) - before < 0.3
    assert host.status()["updated"] == written  # nothing new to say: not even looked at again
    double = await host.start_double("web01")  # head profile replaces the stale file
    await wait_attached(double, "cocoon-fs-data")
    assert len(daemon.matching(r"api socket is stale vm=web01")) == 1


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of the process so far (/proc/<pid>/stat fields 14 and 15)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def test_backend_appearing_late_is_attached_without_early_add_fs(host: Host) -> None:
    host.write_config({"web01": ["data"]})
    double = await host.start_double("web01")
    daemon = await host.start_daemon()
    await daemon.wait_for(r"waiting for backend vm=web01 tag=data")
    assert await add_fs_ids(double) == []  # never add-fs on a missing backend: CH would stall 60 s
    await host.start_backend("web01", "data")
    await wait_attached(double, "cocoon-fs-data")
    assert await add_fs_ids(double) == ["cocoon-fs-data"]


async def test_daemon_restart_adds_nothing_twice(host: Host) -> None:
    host.write_config({"web01": ["data"]})
    double = await host.start_double("web01")
    await host.start_backend("web01", "data")
    first = await host.start_daemon()
    await wait_attached(double, "cocoon-fs-data")
    assert await first.stop() == 0
    second = await host.start_daemon()
    await second.wait_for(r"already attached vm=web01 tag=data")
    assert await add_fs_ids(double) == ["cocoon-fs-data"]


async def test_shared_memory_off_is_one_clear_error_and_no_retry(host: Host) -> None:
    host.write_config({"web01": ["data"], "web02": ["data"]})
    bad = await host.start_double("web01", "--no-memory-shared")
    await host.start_backend("web01", "data")
    daemon = await host.start_daemon()
    line = await daemon.wait_for(r"attach failed vm=web01 tag=data")
    assert "shared memory" in line
    assert "fix=" in line
    await eventually(lambda: host.share_state("web01", "data") == "failed", "failed in state")
    # Let the daemon do more work elsewhere, then check it did not retry web01.
    good = await host.start_double("web02")
    await host.start_backend("web02", "data")
    await wait_attached(good, "cocoon-fs-data")
    assert await add_fs_ids(bad) == ["cocoon-fs-data"]
    assert len(daemon.matching(r"attach failed vm=web01")) == 1


async def test_hung_api_does_not_delay_a_healthy_vm(host: Host) -> None:
    host.write_config({"hung": ["data"], "web01": ["data"]})
    hung = await host.start_double("hung")
    await hung.call("hang", on=True)
    await host.start_backend("hung", "data")
    daemon = await host.start_daemon()
    healthy = await host.start_double("web01")
    await host.start_backend("web01", "data")
    await wait_attached(healthy, "cocoon-fs-data")
    await daemon.wait_for(r"attached vm=web01")
    assert daemon.matching(r"attached vm=hung") == []
    await hung.call("hang", on=False)
    await wait_attached(hung, "cocoon-fs-data")


async def test_one_folder_per_vm_layout(host: Host) -> None:
    pattern = str(host.root / "cocoon" / "{vm}" / "api.sock")
    host.write_config({"web01": ["data"]}, api_socket=pattern)
    await host.start_backend("web01", "data")
    daemon = await host.start_daemon()
    await daemon.wait_for(r"ready ")
    vm_dir = host.root / "cocoon" / "web01"
    vm_dir.mkdir(parents=True)  # folder and socket appear together, like Cocoon starting a VM
    double = await host.start_double("web01", api_socket=str(vm_dir / "api.sock"))
    await wait_attached(double, "cocoon-fs-data")
    lock = vm_dir / "api.sock.lock"  # CH's lock file is not an API socket
    assert lock.exists()


@pytest.mark.parametrize(
    ("answer", "why"),
    [
        (b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n", "404"),  # Firecracker
        (b"HTTP/1.1 200 OK\r\nContent-Length: 13\r\n\r\n<html></html>", "not JSON"),
    ],
)
async def test_socket_that_is_not_ch_gets_one_clear_error(
    host: Host, answer: bytes, why: str
) -> None:
    host.write_config({"fc": ["data"]})

    async def not_ch(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await reader.readuntil(b"\r\n\r\n"):
            writer.write(answer)
            await writer.drain()

    server = await asyncio.start_unix_server(not_ch, host.api_socket("fc"))
    try:
        daemon = await host.start_daemon()
        line = await daemon.wait_for(r"backend does not support fs attach vm=fc")
        assert why in line
        await daemon.wait_for(r"ready ")
        assert len(daemon.matching(r"vm=fc ")) == 1
    finally:
        server.close()


async def test_ch_at_its_connection_limit_is_busy_not_another_api(host: Host) -> None:
    """micro_http answers the 11th connection with a raw 503 (§9): CH, just busy."""
    host.write_config({"web01": ["data"]})
    double = await host.start_double("web01")
    await host.start_backend("web01", "data")
    held = [await asyncio.open_unix_connection(host.api_socket("web01")) for _ in range(10)]
    try:
        daemon = await host.start_daemon()
        await daemon.wait_for(r"attach retrying vm=web01 tag=data .*Too many open connections")
        assert await add_fs_ids(double) == []
    finally:
        for _, writer in held:
            writer.close()
    await wait_attached(double, "cocoon-fs-data")
    assert daemon.matching(r"does not support fs attach") == []


async def test_give_up_after_bounds_the_retries(host: Host) -> None:
    host.write_config({"web01": ["data"]}, retry_extra="give_up_after = 0.5")
    await host.start_double("web01", "--vm", "none")  # "VM is not created", for ever
    await host.start_backend("web01", "data")
    daemon = await host.start_daemon()
    await daemon.wait_for(r"giving up vm=web01")
    await eventually(lambda: host.share_state("web01", "data") == "failed", "failed")
    assert host.share_doc("web01", "data")["detail"].startswith("gave up after 0.5s")


async def test_a_ch_that_pings_but_garbles_vm_info_is_logged_once(host: Host) -> None:
    host.write_config({"web01": ["data"]})
    await host.start_backend("web01", "data")
    body = b'{"version":"1.0","pid":1}'  # a fine vmm.ping, a vm.info without state
    answer = b"HTTP/1.1 200 \r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)

    async def half_ch(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
                while await reader.readuntil(b"\r\n\r\n"):
                    writer.write(answer)
                    await writer.drain()
        finally:
            writer.close()

    server = await asyncio.start_unix_server(half_ch, host.api_socket("web01"))
    try:
        daemon = await host.start_daemon()
        await eventually(
            lambda: host.share_doc("web01", "data").get("attempt", 0) >= 4, "a few attempts"
        )
        assert len(daemon.matching(r"CH not answering vm=web01 .*has no state")) == 1
        assert daemon.matching(r"CH answers again") == []
    finally:
        server.close()


async def test_sigterm_during_backoff_exits_0(host: Host) -> None:
    host.write_config({"web01": ["data"]}, backoff=(60, 120))
    await host.start_double("web01", "--vm", "none")  # "VM is not created": retried
    await host.start_backend("web01", "data")
    daemon = await host.start_daemon()
    await daemon.wait_for(r"attach retrying vm=web01 tag=data")
    # Now in a 60 s backoff: exiting within the stop deadline means it did not wait it out.
    assert await daemon.stop(signal.SIGTERM, timeout=10) == 0


async def test_sigterm_during_a_hung_api_call_exits_0(host: Host) -> None:
    host.write_config({"web01": ["data"]})
    double = await host.start_double("web01")
    await double.call("hang", on=True)
    daemon = await host.start_daemon()

    async def ping_pending() -> bool:
        return bool(await double.requests("/api/v1/vmm.ping"))

    await eventually(ping_pending, "the daemon's ping reached the hung double")
    assert await daemon.stop(signal.SIGTERM, timeout=10) == 0


async def test_sigterm_during_a_hung_add_fs_exits_0(host: Host) -> None:
    """A backend socket that listens but is never served hangs CH's add-fs (no handshake
    timeout, §7), and add-fs's own deadline is 90 s: the stop must not wait for it."""
    host.write_config({"web01": ["data"]})
    unserved = socket.socket(socket.AF_UNIX)
    unserved.bind(host.backend_socket("web01", "data"))
    unserved.listen(1)
    try:
        double = await host.start_double("web01")
        daemon = await host.start_daemon()

        async def add_fs_pending() -> bool:
            return bool(await double.requests(ADD_FS))

        await eventually(add_fs_pending, "the daemon's add-fs reached the double")
        assert await daemon.stop(signal.SIGTERM, timeout=10) == 0
    finally:
        unserved.close()


async def test_a_hung_ch_is_logged_once_and_its_recovery_too(host: Host) -> None:
    host.write_config({"web01": ["data"]})
    await host.start_backend("web01", "data")
    double = await host.start_double("web01")
    await double.call("hang", on=True)
    daemon = await host.start_daemon()
    await daemon.wait_for(r"CH not answering vm=web01 reason=.*did not answer in time")
    await double.call("hang", on=False)
    await daemon.wait_for(r"CH answers again vm=web01")
    await wait_attached(double, "cocoon-fs-data")
    assert len(daemon.matching(r"CH not answering")) == 1


async def test_something_else_at_the_api_socket_path_is_named_in_the_status(host: Host) -> None:
    host.write_config({"web01": ["data"]})
    os.mkfifo(host.api_socket("web01"))
    await host.start_daemon()
    await eventually(lambda: bool(host.status().get("vms")), "the state file")
    (vm,) = host.status()["vms"]
    assert "is not a socket, but a FIFO; ignored" in vm["detail"]


async def test_vm_created_later_is_attached_once_booted(host: Host) -> None:
    host.write_config({"web01": ["data"]})
    double = await host.start_double("web01", "--vm", "none")
    await host.start_backend("web01", "data")
    daemon = await host.start_daemon()
    await daemon.wait_for(r"attach retrying vm=web01")
    body = b'{"cpus":{"boot_vcpus":1,"max_vcpus":1},"memory":{"size":1073741824,"shared":true}}'
    api = host.api_socket("web01")
    created = await unixhttp.request(api, "PUT", "/api/v1/vm.create", body, timeout=10)
    assert created.status == 204
    await wait_attached(double, "cocoon-fs-data")  # cold add: written to the config
    booted = await unixhttp.request(api, "PUT", "/api/v1/vm.boot", timeout=30)
    assert booted.status == 204
    await eventually(
        lambda: includes(double.call("backends"), "cocoon-fs-data"), "backend connected at boot"
    )


async def test_real_virtiofsd_backend(host: Host) -> None:
    virtiofsd = "/usr/lib/qemu/virtiofsd"
    if not os.access(virtiofsd, os.X_OK):
        pytest.skip("needs Debian's qemu-system-common (tests/run installs it)")
    host.write_config({"web01": ["data"]})
    double = await host.start_double("web01")
    backend = await BackendProcess.start(
        [
            virtiofsd,
            f"--socket-path={host.backend_socket('web01', 'data')}",
            "-o",
            f"source={host.share_dir}",
            "-o",
            "cache=none",
        ]
    )
    host.backends.append(backend)
    try:
        daemon = await host.start_daemon()
        await daemon.wait_for(r"attached vm=web01 tag=data")
        assert await double.call("backends") == ["cocoon-fs-data"]
    finally:
        await backend.kill()
        lock = "/run/virtiofsd/" + host.backend_socket("web01", "data").replace("/", ".") + ".pid"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock)


async def run_once(host: Host) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "watcher",
        "once",
        "-c",
        str(host.config),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await proc.communicate()
    return await proc.wait(), out.decode()


async def test_once_attaches_and_reports_per_share(host: Host) -> None:
    host.write_config({"web01": ["data", "logs"], "off": ["data"]})
    double = await host.start_double("web01")
    await host.start_backend("web01", "data")
    rc, out = await run_once(host)
    assert rc == 1, out
    assert "data (cocoon-fs-data): attached" in out
    assert "logs (cocoon-fs-logs): waiting-backend: waiting for backend socket" in out
    assert "off: not running" in out
    await host.start_backend("web01", "logs")
    rc, out = await run_once(host)
    assert rc == 0, out
    assert sorted(await add_fs_ids(double)) == ["cocoon-fs-data", "cocoon-fs-logs"]


async def test_resync_restores_a_device_removed_behind_the_daemons_back(host: Host) -> None:
    host.write_config({"web01": ["data"]}, retry_extra="resync = 0.5")
    # The test owns the listening socket and hands it to each backend with --fd (the
    # libvirt pattern), so starting the second backend creates no file: no inotify
    # event pokes the daemon, only its resync can notice the loss.
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(host.backend_socket("web01", "data"))
    listener.listen(8)

    async def backend() -> None:
        argv = [sys.executable, "-m", "watcher.testing.fake_virtiofsd", f"--fd={listener.fileno()}"]
        host.backends.append(await BackendProcess.start(argv, pass_fds=[listener.fileno()]))

    try:
        await backend()
        double = await host.start_double("web01", "--eject", "auto")
        daemon = await host.start_daemon()
        await wait_attached(double, "cocoon-fs-data")
        api = host.api_socket("web01")
        removed = await unixhttp.request(
            api, "PUT", "/api/v1/vm.remove-device", b'{"id":"cocoon-fs-data"}', timeout=10
        )
        assert removed.status == 204
        await eventually(lambda: not host.backends[0].running, "first backend exits at eject")
        await backend()

        async def re_added() -> bool:
            ids = await attached_ids(double)
            return len(await add_fs_ids(double)) == 2 and "cocoon-fs-data" in ids

        await eventually(re_added, "re-added by a resync pass")
        await daemon.wait_for(r"attached vm=web01 tag=data", count=2)
    finally:
        listener.close()


async def test_socket_already_used_by_another_device_is_refused_clearly(host: Host) -> None:
    host.write_config({"web01": ["data"]})
    await host.start_backend("web01", "data")
    double = await host.start_double("web01")
    socket_path = host.backend_socket("web01", "data")
    body = f'{{"tag":"mine","socket":"{socket_path}","id":"myfs"}}'.encode()
    added = await unixhttp.request(
        host.api_socket("web01"), "PUT", "/api/v1/vm.add-fs", body, timeout=30
    )
    assert added.status == 200  # someone else attached a device on our socket
    daemon = await host.start_daemon()
    line = await daemon.wait_for(r"attach refused vm=web01 tag=data")
    assert "already used by device myfs" in line
    await eventually(lambda: host.share_state("web01", "data") == "failed", "failed in status")
    assert await add_fs_ids(double) == ["myfs"]  # ours was never sent: CH would hang


async def test_unreachable_backend_is_not_retried_until_its_socket_is_recreated(
    host: Host,
) -> None:
    host.write_config({"web01": ["data"]}, retry_extra="resync = 0.2")
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(host.backend_socket("web01", "data"))  # a file nobody listens on
    stale.close()
    double = await host.start_double("web01", "--connect-timeout", "0.3")
    daemon = await host.start_daemon()
    line = await daemon.wait_for(r"backend unreachable vm=web01 tag=data")
    assert "waiting for the socket to be re-created" in line
    pings = len(await double.requests("/api/v1/vmm.ping"))

    async def three_more_passes() -> bool:
        return len(await double.requests("/api/v1/vmm.ping")) >= pings + 3

    await eventually(three_more_passes, "three resync passes")
    assert await add_fs_ids(double) == ["cocoon-fs-data"]  # one 60 s stall, not one per pass
    await host.start_backend("web01", "data")  # re-created by a new virtiofsd
    await wait_attached(double, "cocoon-fs-data")


async def test_a_killed_ch_shows_as_not_running_at_once(host: Host) -> None:
    host.write_config({"web01": ["data"]}, retry_extra="resync = 0")
    await host.start_backend("web01", "data")
    double = await host.start_double("web01")
    daemon = await host.start_daemon()
    await wait_attached(double, "cocoon-fs-data")
    await double.kill()  # leaves its socket: no file event, only the pidfd tells
    await daemon.wait_for(r"api socket is stale vm=web01")
    await eventually(lambda: host.share_state("web01", "data") == "pending", "not attached")


async def test_sigterm_during_start_up_with_a_hung_ch_exits_0(host: Host) -> None:
    host.write_config({"web01": ["data"]})
    double = await host.start_double("web01")
    await double.call("hang", on=True)
    daemon = await host.start_daemon()
    await daemon.wait_for(r"starting ")  # READY waits for CH's answer, which never comes
    assert await daemon.stop(signal.SIGTERM, timeout=10) == 0
    assert daemon.matching(r"ready ") == []
