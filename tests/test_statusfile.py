"""The state file: the version-1 document, atomic writes in a real folder, and reading it back."""

from __future__ import annotations

import json
import logging
import os
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from watcher import statusfile
from watcher.state import ShareState, ShareStatus, SocketState, VmStatus
from watcher.statusfile import Document, StatusFileError, StatusFileMissing


def web01() -> VmStatus:
    vm = VmStatus(
        name="web01",
        api_socket="/run/ch/web01.sock",
        socket=SocketState.LIVE,
        ch_version="53.0.0",
        ch_pid=4321,
        vm_state="Running",
        unmanaged=["cocoon-fs-old"],
    )
    vm.shares["data"] = ShareStatus("data", "cocoon-fs-data", ShareState.ATTACHED, since=100.5)
    vm.shares["logs"] = ShareStatus(
        "logs",
        "cocoon-fs-logs",
        ShareState.RETRYING,
        since=90.0,
        detail="vm.add-fs: connection refused",
        attempt=3,
        next_try_at=130.0,
    )
    vm.shares["new"] = ShareStatus("new", "cocoon-fs-new")
    return vm


def render(*vms: VmStatus, valid: bool = True, problems: tuple[str, ...] = ()) -> Document:
    return statusfile.render(
        vms,
        config_path="/etc/virtiofs-reattach/mounts.toml",
        config_files=["/etc/virtiofs-reattach/mounts.toml"],
        config_valid=valid,
        problems=problems,
    )


@pytest.fixture
def private_umask() -> Iterator[None]:
    """The unit runs with UMask=0077; the file and folder must still be readable."""
    old = os.umask(0o077)
    yield
    os.umask(old)


def test_render_builds_the_version_1_document() -> None:
    idle = VmStatus(name="db02", api_socket="/run/ch/db02.sock")
    before = time.time()
    document = render(web01(), idle, valid=False, problems=("mounts.toml:3:1: bad",))
    after = time.time()

    assert document["version"] == 1
    assert document["pid"] == os.getpid()
    assert before <= document["updated"] <= after
    assert document["config"] == {
        "path": "/etc/virtiofs-reattach/mounts.toml",
        "files": ["/etc/virtiofs-reattach/mounts.toml"],
        "valid": False,
        "problems": ["mounts.toml:3:1: bad"],
    }
    first, second = document["vms"]
    assert first == {
        "name": "web01",
        "api_socket": "/run/ch/web01.sock",
        "socket": "live",
        "ch_version": "53.0.0",
        "ch_pid": 4321,
        "vm_state": "Running",
        "detail": "",
        "shares": [
            {
                "tag": "data",
                "device_id": "cocoon-fs-data",
                "state": "attached",
                "since": 100.5,
                "detail": "",
                "fix": "",
                "attempt": 0,
                "next_try_at": None,
            },
            {
                "tag": "logs",
                "device_id": "cocoon-fs-logs",
                "state": "retrying",
                "since": 90.0,
                "detail": "vm.add-fs: connection refused",
                "fix": "",
                "attempt": 3,
                "next_try_at": 130.0,
            },
            {
                "tag": "new",
                "device_id": "cocoon-fs-new",
                "state": "pending",
                "since": None,
                "detail": "",
                "fix": "",
                "attempt": 0,
                "next_try_at": None,
            },
        ],
        "unmanaged": ["cocoon-fs-old"],
    }
    assert second["socket"] == "absent"
    assert second["ch_pid"] is None
    assert second["shares"] == []


@pytest.mark.parametrize("state", list(ShareState))
def test_every_share_state_is_written_by_its_value(state: ShareState) -> None:
    vm = VmStatus(name="vm", api_socket="/s")
    vm.shares["t"] = ShareStatus("t", "cocoon-fs-t", state, since=1.0)
    assert render(vm)["vms"][0]["shares"][0]["state"] == state.value


@pytest.mark.parametrize("socket_state", list(SocketState))
def test_every_socket_state_is_written_by_its_value(socket_state: SocketState) -> None:
    vm = VmStatus(name="vm", api_socket="/s", socket=socket_state)
    assert render(vm)["vms"][0]["socket"] == socket_state.value


def test_write_then_read_round_trips(tmp_path: Path) -> None:
    path = str(tmp_path / "state.json")
    document = render(web01())
    assert statusfile.write(path, document)
    assert statusfile.read(path) == document


def test_write_creates_a_missing_folder_0755_and_a_0644_file(
    tmp_path: Path, private_umask: None
) -> None:
    folder = tmp_path / "run" / "virtiofs-reattach"
    path = folder / "state.json"
    assert statusfile.write(str(path), render())
    assert stat.S_IMODE(folder.stat().st_mode) == 0o755
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_write_replaces_the_file_instead_of_rewriting_it(tmp_path: Path) -> None:
    """A reader that opened the old file keeps a whole old document, never a torn one."""
    path = tmp_path / "state.json"
    assert statusfile.write(str(path), render())
    with path.open() as old_reader:
        assert statusfile.write(str(path), render(web01()))
        assert json.load(old_reader)["vms"] == []
    assert statusfile.read(str(path))["vms"][0]["name"] == "web01"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


def test_a_failed_write_leaves_no_temp_file_and_returns_false(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    path.mkdir()  # os.replace cannot put a file over a directory
    assert statusfile.write(str(path), render()) is False
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


def test_a_persistent_write_failure_is_logged_once_until_it_recovers(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="watcher.statusfile")
    blocker = tmp_path / "run"
    blocker.write_text("a file where the folder should be")
    path = str(blocker / "state.json")

    assert statusfile.write(path, render()) is False
    assert statusfile.write(path, render()) is False
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1
    assert "cannot write state file" in errors[0].getMessage()
    assert path in errors[0].getMessage()

    blocker.unlink()
    assert statusfile.write(path, render())
    assert "state file written again" in caplog.records[-1].getMessage()


def test_read_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(StatusFileMissing, match="no state file at"):
        statusfile.read(str(tmp_path / "state.json"))


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b'{"version": 1, "pid": 3', "corrupt \\(not JSON"),
        (b"\xff\xfe", "corrupt \\(not JSON"),
        (b"[1, 2]", "corrupt \\(no version\\)"),
        (b'{"version": 2}', "has version 2; this virtiofs-reattach reads version 1"),
        (b'{"version": 1, "pid": 1}', "corrupt \\(missing config, updated, vms\\)"),
    ],
)
def test_read_refuses_what_it_cannot_trust(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "state.json"
    path.write_bytes(content)
    with pytest.raises(StatusFileError, match=message) as caught:
        statusfile.read(str(path))
    assert not isinstance(caught.value, StatusFileMissing)


def test_read_names_where_a_nested_key_is_missing(tmp_path: Path) -> None:
    document = json.loads(json.dumps(render(web01())))
    del document["vms"][0]["shares"][1]["state"]
    path = tmp_path / "state.json"
    path.write_text(json.dumps(document))
    with pytest.raises(StatusFileError, match=r"missing state in vms\[0\]\.shares\[1\]"):
        statusfile.read(str(path))


def test_read_ignores_keys_it_does_not_know(tmp_path: Path) -> None:
    document = json.loads(json.dumps(render(web01())))
    document["later"] = {"added": True}
    document["vms"][0]["shares"][0]["bytes"] = 7
    path = tmp_path / "state.json"
    path.write_text(json.dumps(document))
    assert statusfile.read(str(path))["vms"][0]["shares"][0]["tag"] == "data"
