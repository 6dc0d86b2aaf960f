"""One daemon per runtime_dir: the lock itself, and `run` refusing to start a second daemon.

The daemons are real processes on one config; the first must keep working
while the second is turned away, and a daemon after it must start.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import DEADLINE, Host, eventually
from tests.test_e2e import add_fs_ids, wait_attached
from watcher.daemonlock import DaemonLock, LockHeld, LockUnavailable, lock_path

FIX = (
    "stop it (systemctl stop virtiofs-reattach), "
    "or give this one its own [backend] runtime_dir and --state-file"
)


def test_a_held_lock_names_its_holder_and_close_releases_it(tmp_path: Path) -> None:
    run = tmp_path / "run"
    lock = DaemonLock.acquire(str(run))
    with pytest.raises(LockHeld) as held:
        DaemonLock.acquire(str(run))
    assert held.value.pid == os.getpid()
    assert held.value.path == str(run / ".daemon.lock")
    lock.close()
    with DaemonLock.acquire(str(run)) as again:
        assert again.path == lock_path(str(run))


def test_folder_and_file_modes_do_not_follow_the_umask(tmp_path: Path) -> None:
    run = tmp_path / "deep" / "run"
    old = os.umask(0o077)  # the unit's UMask=
    try:
        with DaemonLock.acquire(str(run)) as lock:
            assert stat.S_IMODE(os.stat(run).st_mode) == 0o755
            assert stat.S_IMODE(os.stat(lock.path).st_mode) == 0o644
            assert Path(lock.path).read_text() == f"{os.getpid()}\n"
    finally:
        os.umask(old)


def test_a_stale_pid_from_an_earlier_holder_is_replaced(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / ".daemon.lock").write_text("4194304999\n")  # longer than any pid written now
    with DaemonLock.acquire(str(run)) as lock:
        assert Path(lock.path).read_text() == f"{os.getpid()}\n"


def test_a_child_process_does_not_inherit_the_lock(tmp_path: Path) -> None:
    """Managed virtiofsd processes outlive the daemon; one holding the lock would keep
    every later daemon from starting."""
    run = tmp_path / "run"
    lock = DaemonLock.acquire(str(run))
    with subprocess.Popen(
        [sys.executable, "-c", "import sys; print('running', flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        close_fds=False,
    ) as child:
        assert child.stdin is not None
        assert child.stdout is not None
        try:
            # Popen returns before the kernel is done with exec: close-on-exec descriptors are
            # closed after the parent is woken, so wait until the child's own code runs.
            assert child.stdout.readline() == b"running\n"
            lock.close()
            assert child.poll() is None
            DaemonLock.acquire(str(run)).close()
        finally:
            child.stdin.close()  # its read ends, and so does the child


@pytest.mark.parametrize("runtime_dir", ["file", "file/run"])
def test_a_folder_that_cannot_be_created_is_a_clear_error(tmp_path: Path, runtime_dir: str) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(LockUnavailable) as failed:
        DaemonLock.acquire(str(tmp_path / runtime_dir))
    assert failed.value.path == str(tmp_path / runtime_dir / ".daemon.lock")
    assert failed.value.reason == f"a file is in the way of the folder {tmp_path / runtime_dir}"
    assert failed.value.fix == "remove that file, or set [backend] runtime_dir to a folder"


def write_config(folder: Path, runtime_dir: Path) -> Path:
    config = folder / "mounts.toml"
    api_socket = f"{folder}/{{vm}}.sock"
    config.write_text(
        f'[watch]\napi_socket = "{api_socket}"\n[backend]\nruntime_dir = "{runtime_dir}"\n'
    )
    return config


def run_cli(config: Path, *prefix: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*prefix, sys.executable, "-m", "watcher", "run", "-c", str(config)],
        capture_output=True,
        text=True,
        timeout=DEADLINE,
        check=False,
    )


def test_run_exits_1_naming_the_lock_it_cannot_create(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    runtime_dir = tmp_path / "file" / "run"
    config = write_config(tmp_path, runtime_dir)
    result = run_cli(config)
    assert result.returncode == 1
    assert "cannot take the daemon lock" in result.stderr
    assert f"lock={runtime_dir}/.daemon.lock" in result.stderr
    assert 'fix="remove that file, or set [backend] runtime_dir to a folder"' in result.stderr
    assert "starting" not in result.stderr


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv (util-linux)")
def test_a_user_who_may_not_write_the_lock_is_still_told_who_holds_it(tmp_path: Path) -> None:
    """Someone trying `run` by hand while the service runs: the file is root's, mode 0644."""
    runtime_dir = tmp_path / "run"
    config = write_config(tmp_path, runtime_dir)
    with DaemonLock.acquire(str(runtime_dir)) as lock:
        os.chmod(lock.path, 0o444)  # not writable for its owner either, without DAC_OVERRIDE
        result = run_cli(config, "setpriv", "--bounding-set=-dac_override,-dac_read_search")
    assert result.returncode == 1
    assert f"another daemon is running pid={os.getpid()}" in result.stderr


async def test_a_second_daemon_refuses_and_the_first_keeps_working(host: Host) -> None:
    host.write_config({"web01": ["data"]})
    await host.start_backend("web01", "data")
    double = await host.start_double("web01")
    first = await host.start_daemon()
    await first.wait_for("ready ")
    await wait_attached(double, "cocoon-fs-data")

    second = await host.start_daemon()
    async with asyncio.timeout(DEADLINE):
        rc = await second.proc.wait()
    await second.stop()  # collects the rest of its stderr
    assert rc == 1
    (line,) = second.matching("another daemon is running")
    assert f"pid={first.proc.pid} " in line
    assert f"lock={host.root / 'run' / '.daemon.lock'} " in line
    assert f'fix="{FIX}"' in line
    assert not second.matching("starting config=")  # it touched nothing

    # The first one still does its job (an edit adds a share), and the state file is its own.
    assert first.proc.returncode is None
    assert host.status()["pid"] == first.proc.pid
    await host.start_backend("web01", "logs")
    host.write_config({"web01": ["data", "logs"]})
    await wait_attached(double, "cocoon-fs-data", "cocoon-fs-logs")
    assert await add_fs_ids(double) == ["cocoon-fs-data", "cocoon-fs-logs"]  # each added once

    assert await first.stop() == 0
    third = await host.start_daemon()
    await third.wait_for(r"already attached vm=web01 tag=logs")
    await eventually(lambda: host.status().get("pid") == third.proc.pid, "third's state file")
