"""The state file (statusfile) and what `status` shows from it (statusview).

The document is written atomically into real tmp_path folders; the view's
"not running" verdict is checked against a real, reaped child pid, and its
"stale" verdict against this test's own (live) pid.

Socket states the daemon may not produce yet ("checking") are set in the
document directly: the view reads strings, not SocketState.
"""

from __future__ import annotations

import json
import logging
import os
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from watcher import statusfile, statusview
from watcher.backends_share import BackendStatus
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
    vm.shares["data"] = ShareStatus(
        "data",
        "cocoon-fs-data",
        ShareState.ATTACHED,
        since=100.5,
        backend=BackendStatus(
            "web01", "data", "/run/r/web01/data.sock", "serving", 5120, 2, "0", "gone"
        ),
    )
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
                "backend": {
                    "state": "serving",
                    "pid": 5120,
                    "restarts": 2,
                    "last_error": "gone",
                    "fix": None,
                },
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
                "backend": None,
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
                "backend": None,
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


def test_read_accepts_a_document_from_before_shares_had_a_backend(tmp_path: Path) -> None:
    document = json.loads(json.dumps(render(web01())))
    for share in document["vms"][0]["shares"]:
        del share["backend"]
    path = tmp_path / "state.json"
    path.write_text(json.dumps(document))
    read = statusfile.read(str(path))
    assert "backend" not in read["vms"][0]["shares"][0]
    assert "virtiofsd" not in statusview.human(read, now=NOW)


# ---- statusview: what `virtiofs-reattach status` prints from the file -------------------

NOW = 1_000_000.0


def share_line(document: Document, tag: str) -> str:
    text = statusview.human(document, now=NOW)
    (line,) = [ln for ln in text.splitlines() if ln.split()[1:2] == [tag]]
    return line


def one_share(state: ShareState, **fields: Any) -> VmStatus:
    vm = VmStatus(
        name="web01",
        api_socket="/run/ch/web01.sock",
        socket=SocketState.LIVE,
        ch_version="53.0.0",
        ch_pid=4321,
        vm_state="Running",
    )
    vm.shares["data"] = ShareStatus("data", "cocoon-fs-data", state, **fields)
    return vm


@pytest.mark.parametrize(
    ("state", "fields", "expected"),
    [
        (ShareState.PENDING, {}, "web01  data  pending             -"),
        (ShareState.ATTACHED, {"since": NOW - 180}, "web01  data  attached           3m"),
        (
            ShareState.WAITING_BACKEND,
            {"since": NOW - 42, "detail": "no virtiofsd at /run/vfs/data.sock"},
            "web01  data  waiting-backend   42s  no virtiofsd at /run/vfs/data.sock",
        ),
        (
            ShareState.WAITING_EJECT,
            {"since": NOW - 7200, "detail": "old device still ejecting", "next_try_at": NOW + 5},
            "web01  data  waiting-eject      2h  old device still ejecting (next try in 5s)",
        ),
        (
            ShareState.RETRYING,
            {
                "since": NOW - 12,
                "detail": "vm.add-fs: connection refused",
                "attempt": 3,
                "next_try_at": NOW + 2,
            },
            "web01  data  retrying          12s  vm.add-fs: connection refused"
            " (attempt 3, next try in 2s)",
        ),
        (
            ShareState.FAILED,
            {
                "since": NOW - 3 * 86400,
                "detail": "shared memory is off",
                "fix": "start the VM with --memory shared=on",
            },
            "web01  data  failed             3d  shared memory is off;"
            " fix: start the VM with --memory shared=on",
        ),
    ],
)
def test_human_view_shows_each_share_state(
    state: ShareState, fields: dict[str, Any], expected: str
) -> None:
    assert share_line(render(one_share(state, **fields)), "data") == expected


@pytest.mark.parametrize(
    ("state", "pid", "restarts", "error", "fix", "expected"),
    [
        ("listening", 123, 0, None, None, "virtiofsd: listening pid 123"),
        (
            "serving",
            123,
            2,
            "failed to stat source",
            None,
            "virtiofsd: serving pid 123, 2 restarts, last error: failed to stat source",
        ),
        (
            "backoff",
            None,
            1,
            "failed to stat source",
            "create the folder",
            "virtiofsd: backoff, 1 restart, last error: failed to stat source;"
            " fix: create the folder",
        ),
        ("stopped", None, 0, None, None, "virtiofsd: stopped"),
    ],
)
def test_human_view_shows_a_managed_share_s_virtiofsd_under_it(
    state: Any, pid: int | None, restarts: int, error: str | None, fix: str | None, expected: str
) -> None:
    backend = BackendStatus("web01", "data", "/r/data.sock", state, pid, restarts, None, error, fix)
    vm = one_share(ShareState.ATTACHED, since=NOW - 180, backend=backend)
    vm.shares["external"] = ShareStatus("external", "cocoon-fs-external")
    lines = statusview.human(render(vm), now=NOW).splitlines()
    share = lines.index("web01  data      attached           3m")
    assert lines[share + 1] == f"web01            {expected}"
    assert lines[share + 2].startswith("web01  external  pending")
    assert sum("virtiofsd" in line for line in lines) == 1  # none for the external share


def test_human_view_header_vm_line_and_unmanaged_devices() -> None:
    idle = VmStatus(name="db02", api_socket="/run/ch/db02.sock", detail="no API socket")
    idle.shares["db"] = ShareStatus("db", "cocoon-fs-db")
    document = render(web01(), idle)
    document["pid"] = 812
    document["updated"] = NOW - 4
    lines = statusview.human(document, now=NOW).splitlines()
    assert lines[0] == (
        "virtiofs-reattach pid 812, updated 4s ago;"
        " config /etc/virtiofs-reattach/mounts.toml valid (1 file)"
    )
    assert "web01  socket live, CH 53.0.0, pid 4321, VM Running" in lines
    assert "web01  not in the config, left attached (prune is off): cocoon-fs-old" in lines
    assert "db02   socket absent: no API socket" in lines
    assert "db02   db    pending             -" in lines


def test_human_view_lists_config_problems_and_no_vms() -> None:
    document = render(valid=False, problems=("mounts.toml:3:1: Invalid value",))
    lines = statusview.human(document, now=NOW).splitlines()
    assert lines[0].endswith("INVALID (1 problem) (1 file)")
    assert lines[1:] == ["  mounts.toml:3:1: Invalid value", "no VMs configured"]


def test_human_view_header_counts_in_the_plural() -> None:
    document = render(valid=False, problems=("a.toml:1:1: bad", "b.toml:2:1: bad"))
    document["config"]["files"] = ["a.toml", "b.toml"]
    header = statusview.human(document, now=NOW).splitlines()[0]
    assert header.endswith("INVALID (2 problems) (2 files)")


def with_socket(document: Document, socket_state: str) -> Document:
    for vm in document["vms"]:
        vm["socket"] = socket_state
    return document


def vm_line(document: Document) -> str:
    return statusview.human(document, now=NOW).splitlines()[1]


def test_human_view_says_when_ch_answers_but_has_no_vm() -> None:
    """CH listens before it creates its VM (or waits for vm.create): vm.info has no state."""
    vm = VmStatus(
        name="web01",
        api_socket="/run/ch/web01.sock",
        socket=SocketState.LIVE,
        ch_version="53.0.0",
        ch_pid=4321,
    )
    assert vm_line(render(vm)) == "web01  socket live, CH 53.0.0, pid 4321, VM not created"


@pytest.mark.parametrize(
    ("socket_state", "expected"),
    [
        ("checking", "web01  socket checking"),
        ("absent", "web01  socket absent"),
        ("stale", "web01  socket stale"),
    ],
)
def test_human_view_claims_no_vm_state_before_ch_answers(socket_state: str, expected: str) -> None:
    vm = VmStatus(name="web01", api_socket="/run/ch/web01.sock")
    assert vm_line(with_socket(render(vm), socket_state)) == expected


def live(*states: ShareState, socket_state: SocketState = SocketState.LIVE) -> VmStatus:
    vm = VmStatus(name=f"vm-{socket_state.value}", api_socket="/s", socket=socket_state)
    for i, state in enumerate(states):
        vm.shares[f"t{i}"] = ShareStatus(f"t{i}", f"cocoon-fs-t{i}", state)
    return vm


@pytest.mark.parametrize(
    ("document", "code"),
    [
        (render(), 0),
        (render(live(ShareState.ATTACHED, ShareState.ATTACHED)), 0),
        (render(live(ShareState.ATTACHED, ShareState.RETRYING)), 1),
        (render(live(ShareState.PENDING)), 1),
        (render(live(ShareState.FAILED)), 1),
        (render(live(ShareState.PENDING, socket_state=SocketState.ABSENT)), 0),
        (render(live(ShareState.PENDING, socket_state=SocketState.STALE)), 0),
        (render(live(ShareState.ATTACHED), valid=False, problems=("x",)), 1),
        (with_socket(render(live(ShareState.PENDING)), "checking"), 1),
        (with_socket(render(live()), "checking"), 1),
        (render(live(ShareState.RETRYING, socket_state=SocketState.UNREACHABLE)), 1),
    ],
    ids=[
        "no-vms",
        "all-attached",
        "one-retrying",
        "pending",
        "failed",
        "vm-not-running",
        "stale-socket",
        "config-invalid",
        "checking",
        "checking-no-shares",
        "unreachable",
    ],
)
def test_exit_code(document: Document, code: int) -> None:
    assert statusview.exit_code(document) == code


@pytest.fixture
def dead_pid() -> int:
    """A pid that certainly existed and is now reaped."""
    child = subprocess.Popen([sys.executable, "-c", ""])
    child.wait()
    return child.pid


def test_pid_liveness(dead_pid: int) -> None:
    assert statusview.pid_alive(os.getpid())
    assert not statusview.pid_alive(dead_pid)
    assert not statusview.pid_alive(0)
    assert not statusview.pid_alive(-1)


def test_state_left_by_a_dead_daemon_is_reported_as_not_running(
    tmp_path: Path, dead_pid: int, capsys: pytest.CaptureFixture[str]
) -> None:
    document = render(live(ShareState.ATTACHED))
    document["pid"] = dead_pid
    path = str(tmp_path / "state.json")
    assert statusfile.write(path, document)

    assert statusview.show(path) == 1
    out, err = capsys.readouterr()
    assert out == ""
    written = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(document["updated"]))
    assert err.strip() == (
        f"virtiofs-reattach is not running (state file from {written} left by pid {dead_pid})"
    )


@pytest.mark.parametrize("json_output", [False, True])
def test_state_from_a_live_daemon_that_stopped_writing_is_reported_as_stale(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], json_output: bool
) -> None:
    """A SIGSTOPped or stuck daemon keeps its pid: only the missed heartbeats show it."""
    document = render(live(ShareState.ATTACHED))
    assert document["pid"] == os.getpid()
    document["updated"] = time.time() - 3 * statusfile.HEARTBEAT - 60
    path = str(tmp_path / "state.json")
    assert statusfile.write(path, document)

    assert statusview.show(path, json_output=json_output) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("state is stale: last written ")
    age = int(err.split("last written ")[1].split("s ago")[0])
    assert age >= 3 * statusfile.HEARTBEAT + 60
    assert err.strip().endswith(
        f"s ago by pid {os.getpid()};"
        " the daemon may be hung (check journalctl -u virtiofs-reattach)"
    )


def test_stale_means_older_than_three_heartbeats() -> None:
    document = render()
    document["pid"] = 812
    limit = 3 * statusfile.HEARTBEAT
    assert statusview.stale(document, now=document["updated"] + limit) is None
    assert statusview.stale(document, now=document["updated"] - 5) is None  # clock stepped back
    assert statusview.stale(document, now=document["updated"] + limit + 1.5) == (
        f"state is stale: last written {int(limit + 1.5)}s ago by pid 812;"
        " the daemon may be hung (check journalctl -u virtiofs-reattach)"
    )


def test_show_prints_the_table_and_returns_the_exit_code(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = str(tmp_path / "state.json")
    assert statusfile.write(path, render(web01()))
    assert statusview.show(path) == 1  # web01's "logs" share is retrying
    out, err = capsys.readouterr()
    assert err == ""
    assert "web01  logs  retrying" in out


def test_show_json_prints_the_document_as_is(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = str(tmp_path / "state.json")
    document = render(live(ShareState.ATTACHED))
    assert statusfile.write(path, document)
    assert statusview.show(path, json_output=True) == 0
    out, err = capsys.readouterr()
    assert err == ""
    assert json.loads(out) == document
    assert out.startswith('{\n  "version": 1,')


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "virtiofs-reattach is not running, or cannot write its state (no state file at"),
        (b"{", "is corrupt"),
    ],
)
def test_show_without_a_usable_file_says_why_and_exits_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: bytes | None, message: str
) -> None:
    path = tmp_path / "state.json"
    if content is not None:
        path.write_bytes(content)
    assert statusview.show(str(path), json_output=True) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert message in err
