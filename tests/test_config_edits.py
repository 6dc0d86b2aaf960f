"""Config edits and daemon restarts against live VMs: what is kept, what is handed over.

The rule under test: an edit changes only what it names. A share the edit did
not touch keeps its device, its status and its virtiofsd's live connection; a
managed share that left the config keeps its virtiofsd for as long as a device
of its VM may use it (a guest reboot needs a virtiofsd listening again within
60 s, cloud-hypervisor-api.md §6), also across a daemon restart, and no longer.
"""

from __future__ import annotations

import socket
from pathlib import Path

from tests.support import Host, eventually
from tests.test_e2e import add_fs_ids, wait_attached
from tests.test_managed import managed_host, virtiofsd_pids

__all__ = ["managed_host"]  # the fixture, used by name


def write_raw_config(host: Host, body: str) -> None:
    """A config Host.write_config cannot express (e.g. an explicit managed socket)."""
    head = (
        f'[watch]\napi_socket = "{host.api_pattern}"\n'
        "[retry]\ninitial_delay = 0.05\nmax_delay = 0.5\n"
        f'[backend]\nruntime_dir = "{host.root / "run"}"\n'
    )
    tmp = host.config.with_suffix(".tmp")
    tmp.write_text(head + body)
    tmp.rename(host.config)


async def test_adding_a_share_leaves_the_attached_one_alone(host: Host) -> None:
    host.write_config({"web01": ["data"]})
    await host.start_backend("web01", "data")
    await host.start_backend("web01", "logs")
    double = await host.start_double("web01")
    daemon = await host.start_daemon()
    await wait_attached(double, "cocoon-fs-data")
    await eventually(lambda: host.share_doc("web01", "data").get("state") == "attached", "status")
    since = host.share_doc("web01", "data")["since"]

    host.write_config({"web01": ["data", "logs"]})
    await wait_attached(double, "cocoon-fs-logs")
    await eventually(lambda: host.share_doc("web01", "logs").get("state") == "attached", "status")
    assert host.share_doc("web01", "data")["since"] == since
    assert daemon.matching(r"already attached vm=web01 tag=data") == []
    assert await add_fs_ids(double) == ["cocoon-fs-data", "cocoon-fs-logs"]


async def test_renamed_share_waits_while_the_old_device_awaits_its_eject(host: Host) -> None:
    """CH keeps a removed device's vhost-user connection until the guest ejects it
    (§5); the renamed share must not connect to the same socket meanwhile."""
    host.write_config({"web01": ["data"]}, extra="prune = true")
    await host.start_backend("web01", "data")
    double = await host.start_double("web01", "--eject", "manual")
    daemon = await host.start_daemon()
    await wait_attached(double, "cocoon-fs-data")
    text = host.config.read_text().replace('tag = "data"', 'tag = "data2"')
    host.config.write_text(text)
    await daemon.wait_for(r"detached vm=web01 id=cocoon-fs-data")
    await eventually(
        lambda: "to leave socket" in str(host.share_doc("web01", "data2").get("detail")),
        "the renamed share waits for the old device",
    )
    assert "cocoon-fs-data2" not in await add_fs_ids(double)

    await double.call("eject", id="cocoon-fs-data")
    await eventually(lambda: not host.backends[0].running, "old virtiofsd exits at eject")
    await host.start_backend("web01", "data")
    await wait_attached(double, "cocoon-fs-data2")
    assert (await add_fs_ids(double)).count("cocoon-fs-data2") == 1


async def test_on_demand_edit_of_a_running_vm_keeps_its_virtiofsd(managed_host: Host) -> None:
    host = managed_host
    data, logs = host.root / "data", host.root / "logs"
    data.mkdir()
    logs.mkdir()
    on_demand = 'start = "on-demand"'
    host.write_config({}, backend_extra=on_demand, managed={"web01": [("data", str(data))]})
    await host.start_daemon()
    double = await host.start_double("web01")
    await wait_attached(double, "cocoon-fs-data")
    (serving,) = virtiofsd_pids(host.root)

    managed = {"web01": [("data", str(data)), ("logs", str(logs))]}
    host.write_config({}, backend_extra=on_demand, managed=managed)
    await wait_attached(double, "cocoon-fs-logs")
    assert serving in virtiofsd_pids(host.root)
    assert await double.call("backends") == ["cocoon-fs-data", "cocoon-fs-logs"]
    socket = host.managed_socket("web01", "data")
    assert await double.call("attempts", socket=socket) == [None]  # never reconnected


async def test_share_moved_to_another_socket_hands_over_to_a_new_virtiofsd(
    managed_host: Host,
) -> None:
    host = managed_host
    data = host.root / "data"
    data.mkdir()
    """The old virtiofsd serves the old device until the guest ejects it: CH <= v51
    exits altogether when a device's backend dies under it (§5, §7)."""
    host.write_config({}, managed={"web01": [("data", str(data))]})
    daemon = await host.start_daemon()
    double = await host.start_double("web01", "--profile", "v47", "--eject", "manual")
    await wait_attached(double, "cocoon-fs-data")
    [old_virtiofsd] = virtiofsd_pids(host.root)
    old_socket = host.managed_socket("web01", "data")
    new_socket = str(host.root / "elsewhere" / "data.sock")

    write_raw_config(
        host,
        f'[vm.web01]\nfs = [{{ tag = "data", shared_dir = "{data}", socket = "{new_socket}" }}]\n',
    )
    await daemon.wait_for(r"replacing vm=web01 tag=data")
    await daemon.wait_for(r"virtiofsd of the share's old socket kept until its device leaves")
    await eventually(lambda: len(virtiofsd_pids(host.root)) == 2, "the new one waits beside it")
    assert old_virtiofsd in virtiofsd_pids(host.root)
    assert daemon.matching(r"virtiofsd released") == []
    await double.call("eject", id="cocoon-fs-data")
    await daemon.wait_for(r"virtiofsd released vm=web01 tag=data")
    assert len(daemon.matching(r"kept until its device leaves")) == 1  # one handover, once
    assert daemon.matching(r"no longer configured") == []  # it is, on another socket

    async def on_new_socket() -> bool:
        info = await double.call("info")
        return [fs["socket"] for fs in info["config"].get("fs") or []] == [new_socket]

    await eventually(on_new_socket, "the device re-added on the new socket")
    await eventually(lambda: len(virtiofsd_pids(host.root)) == 1, "only the new virtiofsd runs")
    assert not Path(old_socket).exists()
    assert await double.call("guest-reboot") is True
    assert await double.call("backends") == ["cocoon-fs-data"]


async def test_share_removed_while_the_daemon_was_down_keeps_serving_its_vm(
    managed_host: Host,
) -> None:
    """Without prune the device stays attached, so a guest reboot still needs a
    virtiofsd: the restarted daemon supervises it until the VM is gone."""
    host = managed_host
    data = host.root / "data"
    data.mkdir()
    host.write_config({}, managed={"web01": [("data", str(data))]})
    first = await host.start_daemon()
    double = await host.start_double("web01")
    await wait_attached(double, "cocoon-fs-data")
    assert await first.stop() == 0

    host.write_config({"web01": []})
    second = await host.start_daemon()
    await second.wait_for(r"virtiofsd of a share no longer configured vm=web01 tag=data")
    await second.wait_for(r"adopted virtiofsd left by the previous daemon vm=web01 tag=data")
    for n in range(3):
        assert await double.call("guest-reboot") is True, f"reboot {n + 1}"
        assert await double.call("backends") == ["cocoon-fs-data"], f"after reboot {n + 1}"
    assert await add_fs_ids(double) == ["cocoon-fs-data"]  # by the first daemon only

    await double.stop()  # the VM is gone, and with it the device
    await second.wait_for(r"virtiofsd released vm=web01 tag=data")
    await eventually(lambda: virtiofsd_pids(host.root) == [], "its virtiofsd stopped")
    assert not (host.root / "run" / "web01").exists()


async def test_share_removed_then_restored_keeps_its_virtiofsd(managed_host: Host) -> None:
    """Restored before its VM went away: configured again, so with start = "always"
    its virtiofsd outlives the VM like any configured share's."""
    host = managed_host
    data = host.root / "data"
    data.mkdir()
    host.write_config({}, managed={"web01": [("data", str(data))]})
    daemon = await host.start_daemon()
    first = await host.start_double("web01")
    await wait_attached(first, "cocoon-fs-data")

    host.write_config({"web01": []})
    await daemon.wait_for(r"virtiofsd of a share no longer configured vm=web01 tag=data")
    host.write_config({}, managed={"web01": [("data", str(data))]})
    await daemon.wait_for(r"config reloaded", count=2)
    assert await first.call("guest-reboot") is True
    await first.stop()
    await daemon.wait_for(r"api socket gone vm=web01")
    second = await host.start_double("web01")
    await wait_attached(second, "cocoon-fs-data")
    assert await second.call("backends") == ["cocoon-fs-data"]
    assert daemon.matching(r"releasing virtiofsd|virtiofsd released") == []


async def test_a_backend_known_dead_stays_avoided_across_an_edit(host: Host) -> None:
    """CH spent its connect window (60 s, here 5 s) on a stale socket file, with its
    whole API blocked; an edit of the VM's other shares must not pay that again."""
    host.write_config({"web01": ["data"]})
    with socket.socket(socket.AF_UNIX) as stale:
        stale.bind(host.backend_socket("web01", "data"))  # closed below: a dead file
    await host.start_backend("web01", "logs")
    double = await host.start_double("web01")
    daemon = await host.start_daemon()
    await daemon.wait_for(r"backend unreachable vm=web01 tag=data")

    host.write_config({"web01": ["data", "logs"]})
    await wait_attached(double, "cocoon-fs-logs")
    assert (await add_fs_ids(double)).count("cocoon-fs-data") == 1
    assert "re-created" in str(host.share_doc("web01", "data").get("detail"))


async def test_an_edit_keeps_the_retry_state_of_vms_it_does_not_touch(host: Host) -> None:
    host.write_config({"web01": ["a"], "web02": ["data"]})
    await host.start_backend("web01", "a")
    await host.start_backend("web01", "b")
    await host.start_backend("web02", "data")
    web01 = await host.start_double("web01")
    await host.start_double("web02", "--vm", "none")  # "VM is not created", retried with backoff
    daemon = await host.start_daemon()

    def attempt() -> int:
        return int(host.share_doc("web02", "data").get("attempt", 0))

    await eventually(lambda: attempt() >= 4, "web02 retried a few times")
    host.write_config({"web01": ["a", "b"], "web02": ["data"]})
    await daemon.wait_for("config reloaded")
    await wait_attached(web01, "cocoon-fs-a", "cocoon-fs-b")
    before = attempt()
    await eventually(lambda: attempt() != before, "web02's next attempt")
    assert attempt() == before + 1  # its backoff went on; a new task would count from 1


async def test_backend_changes_wait_for_a_restart(managed_host: Host) -> None:
    """The running virtiofsd, their records and the daemon lock live where [backend] says:
    a reload keeps it, also for the shares' default sockets and for start."""
    host = managed_host
    data = host.root / "data"
    data.mkdir()
    host.write_config({}, managed={"web01": [("data", str(data))], "db": [("data", str(data))]})
    daemon = await host.start_daemon()
    double = await host.start_double("web01")
    await wait_attached(double, "cocoon-fs-data")
    await eventually(lambda: len(virtiofsd_pids(host.root)) == 2, "both virtiofsd running")
    before = sorted(virtiofsd_pids(host.root))
    managed = {"web01": [("data", str(data))], "db": [("data", str(data))]}
    text = host.config_text({}, backend_extra='start = "on-demand"', managed=managed)
    run_dir = f'runtime_dir = "{host.root / "run"}"'
    assert run_dir in text
    host.config.write_text(text.replace(run_dir, f'runtime_dir = "{host.root / "elsewhere"}"'))
    await daemon.wait_for(r"\[backend\] changes apply after a restart of the daemon")
    await daemon.wait_for("config reloaded|config unchanged")
    assert sorted(virtiofsd_pids(host.root)) == before  # db's too, though its VM is down
    assert daemon.matching("replacing") == []
    assert await add_fs_ids(double) == ["cocoon-fs-data"]
