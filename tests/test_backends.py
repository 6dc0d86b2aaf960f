"""The virtiofsd supervisor against real processes: Debian 12's legacy virtiofsd and the fake.

The key behaviours (reboots, the backlog window, a killed backend, a daemon restart under a live
connection) run against the real /usr/lib/qemu/virtiofsd and are skipped only where it is absent.
The fast ones (crash loop, stopping a backend that ignores SIGTERM) use the fake.

Backends other than the real binary are small executable scripts written into tmp_path and set
as ``[backend] virtiofsd``, as an operator would point at a binary: the fake's wrapper appends
its start time to a file, so a test can look at when attempts happened without timing anything
itself; a stubborn backend
ignores SIGTERM; a gate holds the real virtiofsd back until the test lets it start.

Nothing here sleeps to synchronise: tests poll a condition with a deadline, or wait for a
frontend's handshake, which only completes once a virtiofsd serves it. Every test ends with a
check that no process mentioning its tmp_path is left running.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import os
import signal
import socket
import stat
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tests.support import eventually
from watcher.backends import (
    BackendError,
    BackendStatus,
    BackendSupervisor,
    BackendTiming,
)
from watcher.backends_files import Registration, write_registration
from watcher.backends_process import start_ticks
from watcher.backends_virtiofsd import Virtiofsd, find_virtiofsd, probe
from watcher.config import BackendSettings, Share
from watcher.testing.vhost_user import VhostUserFrontend, connect_frontend

REAL_VIRTIOFSD = Path("/usr/lib/qemu/virtiofsd")
VIRTIO_F_VERSION_1 = 1 << 32
DEADLINE = 10.0  # only bounds a hang; nothing here measures speed
FAST = BackendTiming(initial_delay=0.05, max_delay=1.0)

FAKE_WRAPPER = """#!/bin/sh
[ "$1" = --print-capabilities ] || date +%s.%N >> {starts}
exec {python} -m watcher.testing.fake_virtiofsd "$@"
"""

STUBBORN_BACKEND = """#!{python}
# Like the legacy virtiofsd when it misses SIGTERM in accept(): only SIGKILL ends it.
import signal, sys, time
if "--print-capabilities" in sys.argv:
    print('{{"type": "fs", "features": ["separate-options"]}}')
    sys.exit(0)
signal.signal(signal.SIGTERM, signal.SIG_IGN)
print("[INFO  virtiofsd] Waiting for vhost-user socket connection...", file=sys.stderr, flush=True)
time.sleep(600)
"""

GATED_REAL = """#!/bin/sh
# Each start waits for a line on the gate FIFO, so the test decides when a virtiofsd accepts.
[ "$1" = --print-capabilities ] || read -r _ < {gate}
exec {real} "$@"
"""


def command_lines_mentioning(text: str) -> dict[int, str]:
    found = {}
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            cmdline = Path(f"/proc/{name}/cmdline").read_bytes()
            if text.encode() in cmdline:
                found[int(name)] = cmdline.replace(b"\0", b" ").decode(errors="replace")
    return found


def child_pids(pid: int) -> list[int]:
    children = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(child) for child in children.read_text().split()] if children.exists() else []


def is_running(pid: int) -> bool:
    """True while the process exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


@pytest.fixture(autouse=True)
def no_stray_processes(tmp_path: Path) -> Iterator[None]:
    """Fail a test that leaves any process behind whose command line names its tmp_path."""
    yield
    strays = command_lines_mentioning(str(tmp_path))
    for pid in strays:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
    assert not strays, f"processes left running: {strays}"


class Harness:
    """Makes shares, wrapper binaries and supervisors in tmp_path; releases what is left."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.starts = tmp_path / "starts"
        self.shares: list[Share] = []
        self.supervisors: list[BackendSupervisor] = []

    def share(
        self,
        tag: str = "data",
        *,
        shared_dir: Path | None = None,
        readonly: bool = False,
        cache: str = "auto",
    ) -> Share:
        if shared_dir is None:
            shared_dir = self.tmp_path / "share"
            shared_dir.mkdir(exist_ok=True)
        share = Share(
            vm="vm1",
            tag=tag,
            socket=str(self.tmp_path / "sockets" / f"{tag}.sock"),
            num_queues=1,
            queue_size=1024,
            device_id=f"cocoon-fs-{tag}",
            shared_dir=str(shared_dir),
            readonly=readonly,
            cache=cache,
        )
        self.shares.append(share)
        return share

    def script(self, name: str, text: str) -> Path:
        path = self.tmp_path / name
        path.write_text(text)
        path.chmod(0o755)
        return path

    def fake(self) -> Path:
        return self.script(
            "fake-virtiofsd", FAKE_WRAPPER.format(starts=self.starts, python=sys.executable)
        )

    def settings(self, binary: Path) -> BackendSettings:
        return BackendSettings(virtiofsd=str(binary), runtime_dir=str(self.tmp_path / "run"))

    def supervisor(self, binary: Path, timing: BackendTiming = FAST) -> BackendSupervisor:
        supervisor = BackendSupervisor(self.settings(binary), timing)
        self.supervisors.append(supervisor)
        return supervisor

    def start_times(self) -> list[float]:
        if not self.starts.exists():
            return []
        return [float(line) for line in self.starts.read_text().split()]

    async def release_all(self) -> None:
        for supervisor in self.supervisors:
            for share in self.shares:
                if share.socket in supervisor.supervised():
                    await supervisor.release(share)
            await supervisor.close()


@pytest.fixture
async def harness(tmp_path: Path, no_stray_processes: None) -> AsyncIterator[Harness]:
    made = Harness(tmp_path)
    try:
        yield made
    finally:
        await made.release_all()


@pytest.fixture
def real_virtiofsd() -> Path:
    if not REAL_VIRTIOFSD.exists():
        pytest.skip(f"no legacy virtiofsd at {REAL_VIRTIOFSD} (Debian 12 qemu-system-common)")
    return REAL_VIRTIOFSD


def status_of(supervisor: BackendSupervisor, share: Share) -> BackendStatus:
    status = supervisor.status(share.socket)
    assert status is not None
    return status


async def new_pid(supervisor: BackendSupervisor, share: Share, seen: list[int]) -> int:
    """Wait until a virtiofsd runs whose pid is not in ``seen``; return it."""

    def fresh() -> bool:
        pid = status_of(supervisor, share).pid
        return pid is not None and pid not in seen

    await eventually(fresh, f"a virtiofsd other than {seen}", timeout=DEADLINE)
    pid = status_of(supervisor, share).pid
    assert pid is not None
    return pid


async def boot_and_shut_down(socket_path: str) -> int:
    """One VM boot as CH does it: connect, negotiate, later disconnect; return the features."""
    frontend = await connect_frontend(socket_path)
    try:
        async with asyncio.timeout(DEADLINE):
            return await frontend.handshake()
    finally:
        frontend.close()


def open_gate(gate: Path) -> bool:
    """Let one waiting wrapper start its virtiofsd; False while no wrapper waits at the gate."""
    try:
        fd = os.open(gate, os.O_WRONLY | os.O_NONBLOCK)
    except OSError:  # ENXIO: no reader yet
        return False
    try:
        os.write(fd, b"go\n")
    finally:
        os.close(fd)
    return True


def assert_removed(harness: Harness, share: Share) -> None:
    run = harness.tmp_path / "run" / share.vm
    for path in (Path(share.socket), run / f"{share.tag}.json", run / f"{share.tag}.log"):
        assert not path.exists(), f"{path} is left behind"


async def test_twenty_reboots_each_get_a_new_virtiofsd(
    harness: Harness, real_virtiofsd: Path
) -> None:
    supervisor = harness.supervisor(real_virtiofsd)
    share = harness.share()
    await supervisor.ensure(share)
    assert stat.S_ISSOCK(os.lstat(share.socket).st_mode)
    seen = [await new_pid(supervisor, share, [])]
    assert Path(f"/proc/{seen[0]}/cmdline").read_bytes().split(b"\0")[:-1] == [
        str(real_virtiofsd).encode(),
        b"--fd=3",
        b"-o",
        f"source={share.shared_dir}".encode(),
        b"-o",
        b"cache=auto",
    ]

    for boot in range(1, 21):
        assert await boot_and_shut_down(share.socket) & VIRTIO_F_VERSION_1

        seen.append(await new_pid(supervisor, share, seen))
        status = status_of(supervisor, share)
        assert status.last_exit == "rc 0"
        assert status.restarts == boot

    assert not is_running(seen[-2])


async def test_a_vm_connecting_between_two_virtiofsd_is_served_from_the_backlog(
    harness: Harness, real_virtiofsd: Path
) -> None:
    gate = harness.tmp_path / "gate"
    os.mkfifo(gate)
    binary = harness.script("gated", GATED_REAL.format(gate=gate, real=real_virtiofsd))
    supervisor = harness.supervisor(binary)
    share = harness.share()
    await supervisor.ensure(share)
    await eventually(lambda: open_gate(gate), "the first start at the gate", timeout=DEADLINE)
    first = await new_pid(supervisor, share, [])
    await boot_and_shut_down(share.socket)
    second = await new_pid(supervisor, share, [first])
    assert status_of(supervisor, share).last_exit == "rc 0"

    # The second start waits at the gate: nothing accepts, yet the connect succeeds.
    frontend = await connect_frontend(share.socket)
    try:
        handshake = asyncio.create_task(frontend.handshake())
        await eventually(lambda: open_gate(gate), "the second start at the gate", timeout=DEADLINE)
        async with asyncio.timeout(DEADLINE):
            assert await handshake & VIRTIO_F_VERSION_1
        assert status_of(supervisor, share).pid == second
    finally:
        frontend.close()


async def test_a_killed_virtiofsd_is_replaced(harness: Harness, real_virtiofsd: Path) -> None:
    supervisor = harness.supervisor(real_virtiofsd)
    share = harness.share()
    await supervisor.ensure(share)
    killed = await new_pid(supervisor, share, [])

    os.kill(killed, signal.SIGKILL)

    await new_pid(supervisor, share, [killed])
    assert status_of(supervisor, share).last_exit == "killed by SIGKILL"
    assert status_of(supervisor, share).last_error == "killed by SIGKILL"  # not its last line
    assert await boot_and_shut_down(share.socket) & VIRTIO_F_VERSION_1


async def served_then_daemon_stopped(
    harness: Harness, binary: Path
) -> tuple[Share, int, VhostUserFrontend]:
    """A share's virtiofsd serving a VM, then its daemon stopped: the virtiofsd serves on."""
    share = harness.share()
    old_daemon = harness.supervisor(binary)
    await old_daemon.ensure(share)
    serving = await new_pid(old_daemon, share, [])
    frontend = await connect_frontend(share.socket)
    try:
        async with asyncio.timeout(DEADLINE):
            await frontend.handshake()
        await old_daemon.close()
    except BaseException:
        frontend.close()
        raise
    return share, serving, frontend


async def test_a_daemon_restart_keeps_the_live_connection_and_adopts_its_virtiofsd(
    harness: Harness, real_virtiofsd: Path
) -> None:
    share, serving, frontend = await served_then_daemon_stopped(harness, real_virtiofsd)
    try:
        hangup = asyncio.create_task(frontend.wait_hangup())
        new_daemon = harness.supervisor(real_virtiofsd)
        await new_daemon.ensure(share)

        status = status_of(new_daemon, share)
        assert (status.state, status.pid) == ("adopted", serving)
        assert set(command_lines_mentioning(str(harness.tmp_path))) <= {serving} | set(
            child_pids(serving)
        )
        assert not hangup.done()
        hangup.cancel()
        await asyncio.wait([hangup])
        async with asyncio.timeout(DEADLINE):
            assert await frontend.handshake() & VIRTIO_F_VERSION_1
    finally:
        frontend.close()

    successor = await new_pid(new_daemon, share, [serving])
    assert status_of(new_daemon, share).restarts == 1
    assert await boot_and_shut_down(share.socket) & VIRTIO_F_VERSION_1
    await new_pid(new_daemon, share, [serving, successor])


async def test_a_share_moved_while_the_daemon_was_down_keeps_its_old_virtiofsd_until_released(
    harness: Harness, real_virtiofsd: Path
) -> None:
    """Its device on the old socket is replaced, but until the guest ejects it CH holds that
    connection, and CH <= v51 exits when the backend dies under it (§5, §7)."""
    share, serving, frontend = await served_then_daemon_stopped(harness, real_virtiofsd)
    try:
        moved = dataclasses.replace(share, socket=str(harness.tmp_path / "sockets" / "new.sock"))
        harness.shares.append(moved)
        new_daemon = harness.supervisor(real_virtiofsd)
        await new_daemon.ensure(moved)
        await new_pid(new_daemon, moved, [serving])
        assert is_running(serving)
        assert not Path(share.socket).exists()  # nothing new connects to the old one
        async with asyncio.timeout(DEADLINE):
            assert await frontend.handshake() & VIRTIO_F_VERSION_1  # still served

        await new_daemon.release(share)  # the daemon saw no device on the old socket
        assert not is_running(serving)
    finally:
        frontend.close()
    assert await boot_and_shut_down(moved.socket) & VIRTIO_F_VERSION_1


async def test_a_crash_loop_backs_off_and_logs_its_reason_once(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="watcher.backends")
    missing = harness.tmp_path / "missing"
    supervisor = harness.supervisor(harness.fake(), BackendTiming(initial_delay=0.2, max_delay=5))
    share = harness.share(shared_dir=missing)

    await supervisor.ensure(share)
    await eventually(lambda: len(harness.start_times()) >= 4, "four attempts", timeout=DEADLINE)

    starts = harness.start_times()
    gaps = [later - earlier for earlier, later in itertools.pairwise(starts)]
    assert all(shorter < longer for shorter, longer in itertools.pairwise(gaps)), gaps
    reason = f"ERROR virtiofsd] {missing} does not exist"
    status = status_of(supervisor, share)
    assert reason in (status.last_error or "")
    summaries = [r for r in caplog.records if r.getMessage().startswith("virtiofsd failed")]
    assert [reason in summary.getMessage() for summary in summaries] == [True]
    forwarded = [r for r in caplog.records if r.getMessage().startswith("virtiofsd vm=")]
    assert [r.levelno for r in forwarded if reason in r.getMessage()][:3] == [
        logging.ERROR,
        logging.DEBUG,
        logging.DEBUG,
    ]


async def test_release_stops_virtiofsd_and_removes_its_files(harness: Harness) -> None:
    supervisor = harness.supervisor(harness.fake())
    share = harness.share()
    await supervisor.ensure(share)
    pid = await new_pid(supervisor, share, [])
    run = harness.tmp_path / "run" / share.vm
    assert stat.S_ISFIFO(os.lstat(run / "data.log").st_mode)
    assert (run / "data.json").exists()
    (run / "data.json.tmp").write_text("{")  # a daemon crashed while writing the record

    await supervisor.release(share)

    assert not is_running(pid)
    assert_removed(harness, share)
    assert not run.exists()
    assert supervisor.supervised() == set()
    assert supervisor.status(share.socket) is None


SLEEPING_BACKEND = """#!/bin/sh
# A virtiofsd stand-in that waits in "accept" for ever, holding only what it was given.
if [ "$1" = --print-capabilities ]; then
    echo '{{"type": "fs", "features": ["separate-options"]}}'
    exit 0
fi
echo "[INFO  virtiofsd] Waiting for vhost-user socket connection..." >&2
exec sleep 600
"""


async def test_virtiofsd_gets_only_stdio_and_its_listener(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not a descriptor the daemon inherited, nor systemd's variables: a virtiofsd must not be
    able to notify systemd for the daemon, or keep the daemon's files open."""
    monkeypatch.setenv("NOTIFY_SOCKET", "/run/systemd/notify")
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    leaked = os.open(os.devnull, os.O_RDONLY)
    os.set_inheritable(leaked, True)
    try:
        supervisor = harness.supervisor(harness.script("sleeping", SLEEPING_BACKEND.format()))
        share = harness.share()
        await supervisor.ensure(share)
        pid = await new_pid(supervisor, share, [])
        await eventually(lambda: status_of(supervisor, share).state == "listening", "listening")
        fds = {int(fd): os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}
        assert sorted(fds) == [0, 1, 2, 3]
        assert fds[0] == os.devnull
        assert fds[3].startswith("socket:")
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        assert not [v for v in environ if v.startswith((b"NOTIFY_SOCKET=", b"WATCHDOG_"))]
    finally:
        os.close(leaked)


async def test_a_recorded_pid_that_now_names_another_process_is_left_alone(
    harness: Harness,
) -> None:
    """An adopted virtiofsd is not our child: once init reaps it, its pid may be reused."""
    share = harness.share()
    stranger = await asyncio.create_subprocess_exec("sleep", "600")
    try:
        run = harness.tmp_path / "run" / share.vm
        run.mkdir(parents=True)
        ticks = start_ticks(stranger.pid)
        assert ticks is not None
        record = Registration(stranger.pid, ticks - 1, share.socket, (), "", False, "auto")
        write_registration(str(run / f"{share.tag}.json"), record)  # the pid, another start

        supervisor = harness.supervisor(harness.fake())
        await supervisor.ensure(share)
        assert status_of(supervisor, share).pid != stranger.pid  # not adopted: a new one runs
        await supervisor.release(share)
        assert stranger.returncode is None  # nor signalled
        assert is_running(stranger.pid)

        run.mkdir(parents=True, exist_ok=True)
        write_registration(str(run / f"{share.tag}.json"), record)
        await harness.supervisor(harness.fake()).release(share)  # unsupervised release
        assert is_running(stranger.pid)
    finally:
        stranger.kill()
        await stranger.wait()


async def test_release_kills_a_virtiofsd_that_ignores_sigterm(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    binary = harness.script("stubborn", STUBBORN_BACKEND.format(python=sys.executable))
    supervisor = harness.supervisor(binary, BackendTiming(stop_timeout=0.2))
    share = harness.share()
    await supervisor.ensure(share)
    await eventually(
        lambda: status_of(supervisor, share).state == "listening", "SIGTERM ignored", DEADLINE
    )
    pid = status_of(supervisor, share).pid
    assert pid is not None

    await supervisor.release(share)

    assert not is_running(pid)
    assert any("ignored SIGTERM" in r.getMessage() for r in caplog.records)
    assert_removed(harness, share)


async def test_ensure_is_idempotent(harness: Harness) -> None:
    supervisor = harness.supervisor(harness.fake())
    share = harness.share()
    await supervisor.ensure(share)
    pid = await new_pid(supervisor, share, [])

    await supervisor.ensure(share)

    assert status_of(supervisor, share).pid == pid
    assert supervisor.supervised() == {share.socket}
    assert len(harness.start_times()) == 1


async def test_a_stale_socket_file_is_replaced_and_other_files_are_left_alone(
    harness: Harness,
) -> None:
    supervisor = harness.supervisor(harness.fake())
    stale, occupied = harness.share("stale"), harness.share("occupied")
    Path(occupied.socket).parent.mkdir(parents=True)
    Path(occupied.socket).write_text("not a socket")
    with socket.socket(socket.AF_UNIX) as old:
        old.bind(stale.socket)  # bound and closed: a stale file, as a dead listener leaves it

    await supervisor.ensure(stale)
    assert await boot_and_shut_down(stale.socket) & VIRTIO_F_VERSION_1

    with pytest.raises(BackendError, match="not a socket"):
        await supervisor.ensure(occupied)
    assert Path(occupied.socket).read_text() == "not a socket"
    assert status_of(supervisor, occupied).state == "failed"


async def test_a_new_daemon_finds_the_shares_an_earlier_one_ran_and_can_release_them(
    harness: Harness,
) -> None:
    share = harness.share(readonly=True, cache="never")
    old_daemon = harness.supervisor(harness.fake())
    await old_daemon.ensure(share)
    pid = await new_pid(old_daemon, share, [])
    await old_daemon.close()
    assert is_running(pid)

    new_daemon = harness.supervisor(harness.fake())
    (found,) = new_daemon.registered(share.device_id.removesuffix(share.tag))
    assert found == share
    assert is_running(pid)

    await new_daemon.release(found)
    assert not is_running(pid)
    assert_removed(harness, share)
    assert new_daemon.registered("") == []


async def test_probe_tells_the_legacy_flags_from_the_rust_flags(
    harness: Harness, real_virtiofsd: Path
) -> None:
    share = harness.share(cache="never")

    legacy = await probe(str(real_virtiofsd))
    modern = await probe(str(harness.fake()))

    assert legacy == Virtiofsd(str(real_virtiofsd), separate_options=False)
    assert legacy.argv(share, ["--thread-pool-size=1"])[1:] == [
        "--fd=3",
        "-o",
        f"source={share.shared_dir}",
        "-o",
        "cache=none",
        "--thread-pool-size=1",
    ]
    assert modern.separate_options
    assert modern.argv(harness.share("ro", readonly=True), [])[1:] == [
        "--fd=3",
        f"--shared-dir={share.shared_dir}",
        "--cache=auto",
        "--readonly",
    ]


async def test_read_only_on_the_legacy_virtiofsd_fails_without_a_socket(
    harness: Harness, real_virtiofsd: Path
) -> None:
    supervisor = harness.supervisor(real_virtiofsd)
    share = harness.share(readonly=True)

    with pytest.raises(BackendError, match="no read-only mode"):
        await supervisor.ensure(share)

    assert not Path(share.socket).exists()
    status = status_of(supervisor, share)
    assert status.state == "failed"
    assert "no read-only mode" in (status.last_error or "")


def test_a_missing_virtiofsd_says_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("watcher.backends_virtiofsd.CANDIDATES", ())
    monkeypatch.setattr("watcher.backends_virtiofsd.LEGACY", str(tmp_path / "legacy"))
    monkeypatch.setenv("PATH", str(tmp_path))

    with pytest.raises(BackendError, match=r"install virtiofsd \(Debian 13\) or qemu-system"):
        find_virtiofsd(None)
    with pytest.raises(BackendError, match="is not an executable file"):
        find_virtiofsd(str(tmp_path / "nope"))


def test_a_virtiofsd_on_path_comes_before_debian_12_s_legacy_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("watcher.backends_virtiofsd.CANDIDATES", ())
    legacy = tmp_path / "qemu" / "virtiofsd"
    legacy.parent.mkdir()
    legacy.write_text("#!/bin/sh\n")
    legacy.chmod(0o755)
    monkeypatch.setattr("watcher.backends_virtiofsd.LEGACY", str(legacy))
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    assert find_virtiofsd(None) == str(legacy)
    built = tmp_path / "bin" / "virtiofsd"  # say, a Rust virtiofsd in /usr/local/bin
    built.parent.mkdir()
    built.write_text("#!/bin/sh\n")
    built.chmod(0o755)
    assert find_virtiofsd(None) == str(built)


async def test_a_vm_connecting_while_the_daemon_is_down_is_served(
    harness: Harness, real_virtiofsd: Path
) -> None:
    share = harness.share()
    old_daemon = harness.supervisor(real_virtiofsd)
    await old_daemon.ensure(share)
    waiting = await new_pid(old_daemon, share, [])
    await eventually(
        lambda: status_of(old_daemon, share).state == "listening", "accept() reached", DEADLINE
    )

    await old_daemon.close()

    assert stat.S_ISSOCK(os.lstat(share.socket).st_mode)
    frontend = await connect_frontend(share.socket)
    try:
        async with asyncio.timeout(DEADLINE):
            assert await frontend.handshake() & VIRTIO_F_VERSION_1
        new_daemon = harness.supervisor(real_virtiofsd)
        await new_daemon.ensure(share)
        assert status_of(new_daemon, share).pid == waiting
    finally:
        frontend.close()
    await new_pid(new_daemon, share, [waiting])


async def test_changed_settings_apply_from_the_next_start(harness: Harness) -> None:
    supervisor = harness.supervisor(harness.fake())
    share = harness.share()
    await supervisor.ensure(share)
    first = await new_pid(supervisor, share, [])
    moved = harness.tmp_path / "moved"
    moved.mkdir()
    changed = harness.share(shared_dir=moved)

    await supervisor.ensure(changed)

    assert status_of(supervisor, changed).pid == first
    await boot_and_shut_down(share.socket)
    second = await new_pid(supervisor, changed, [first])
    assert f"--shared-dir={moved}".encode() in Path(f"/proc/{second}/cmdline").read_bytes()
