"""InotifyWatcher against real inotify on tmp_path (python-stack.md §1, §8).

No sleeps: events land on an asyncio.Queue and each test awaits them with a
generous deadline. "Nothing is reported" is shown with a sentinel: the test
causes a reportable event after the one that must be ignored and asserts the
sentinel comes next. How many RESCANs a burst gives is counted once the
watcher has settled (nothing left to read, no RESCAN pending), polled with a
deadline. The overflow and out-of-watches tests reach pyinotify as
the adapter loaded it: this project imports the library in one module only.
"""

from __future__ import annotations

import asyncio
import logging
import os
import select
import socket
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from watcher.inotify import FsEvent, FsEventKind, InotifyWatcher

pyinotify = sys.modules["pyinotify"]

DEADLINE = 10.0
CREATED, WRITTEN, REMOVED, RESCAN = (
    FsEventKind.CREATED,
    FsEventKind.WRITTEN,
    FsEventKind.REMOVED,
    FsEventKind.RESCAN,
)


class Watched:
    """A started InotifyWatcher whose events go to a queue."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[FsEvent] = asyncio.Queue()
        self.watcher = InotifyWatcher(self.queue.put_nowait)
        self.watcher.start(asyncio.get_running_loop())

    async def next(self) -> FsEvent:
        return await asyncio.wait_for(self.queue.get(), DEADLINE)

    async def expect(self, kind: FsEventKind, path: Path | str, *, is_socket: bool) -> None:
        event = await self.next()
        assert event == FsEvent(kind, str(path), is_socket)

    async def collect(self, count: int) -> list[FsEvent]:
        return [await self.next() for _ in range(count)]

    async def settled(self) -> list[FsEvent]:
        """Every event reported once inotify has nothing left to read and no RESCAN is pending.

        Only meaningful once whatever causes events has finished.
        """
        deadline = asyncio.get_running_loop().time() + DEADLINE
        fd = self.watcher._fd
        while select.select([fd], [], [], 0)[0] or self.watcher._rescan_handle is not None:
            assert asyncio.get_running_loop().time() < deadline, "events kept coming"
            await asyncio.sleep(0.01)
        events = []
        while not self.queue.empty():
            events.append(self.queue.get_nowait())
        return events

    async def created_until(self, paths: set[str]) -> set[str]:
        """CREATED paths seen until every one of ``paths`` was (duplicates allowed)."""
        seen: set[str] = set()
        while not paths <= seen:
            event = await self.next()
            assert event.kind is CREATED, event
            seen.add(event.path)
        return seen


@pytest.fixture
async def watched() -> AsyncIterator[Watched]:
    harness = Watched()
    yield harness
    harness.watcher.close()


def bind(path: Path) -> Path:
    """Leave a unix socket file at ``path``, as a CH API or virtiofsd socket would."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(path))
    return path


async def test_existing_socket_is_found_by_the_first_scan(watched: Watched, tmp_path: Path) -> None:
    sock = bind(tmp_path / "api.sock")
    watched.watcher.watch(str(tmp_path))
    await watched.expect(CREATED, sock, is_socket=True)


async def test_socket_bound_after_watch_is_created(watched: Watched, tmp_path: Path) -> None:
    watched.watcher.watch(str(tmp_path))
    sock = bind(tmp_path / "api.sock")
    await watched.expect(CREATED, sock, is_socket=True)


async def test_regular_file_is_reported_as_not_a_socket(watched: Watched, tmp_path: Path) -> None:
    watched.watcher.watch(str(tmp_path))
    os.close(os.open(tmp_path / "notes", os.O_CREAT | os.O_RDONLY))
    await watched.expect(CREATED, tmp_path / "notes", is_socket=False)


async def test_sockets_in_freshly_created_subdirectories_are_all_found(
    watched: Watched, tmp_path: Path
) -> None:
    # The race pyinotify's auto_add loses (0/300 observed): the socket is bound
    # right after mkdir, from another thread while the loop arms watches.
    watched.watcher.watch(str(tmp_path), depth=1)
    socks = {str(tmp_path / f"vm{i}" / "api.sock") for i in range(50)}

    def start_vms() -> None:
        for path in sorted(socks):
            os.mkdir(os.path.dirname(path))
            bind(Path(path))

    await asyncio.to_thread(start_vms)
    assert await watched.created_until(socks) == socks


async def test_nothing_is_reported_below_the_depth(watched: Watched, tmp_path: Path) -> None:
    (tmp_path / "old" / "deeper").mkdir(parents=True)
    bind(tmp_path / "old" / "deeper" / "too-deep.sock")
    watched.watcher.watch(str(tmp_path), depth=1)
    (tmp_path / "old" / "deeper" / "late.sock").touch()
    (tmp_path / "vm").mkdir()
    await watched.expect(CREATED, bind(tmp_path / "vm" / "first.sock"), is_socket=True)
    (tmp_path / "vm" / "deeper").mkdir()
    bind(tmp_path / "vm" / "deeper" / "too-deep.sock")
    sentinel = bind(tmp_path / "vm" / "sentinel.sock")
    await watched.expect(CREATED, sentinel, is_socket=True)


async def test_missing_directories_are_waited_for_through_mkdir_p(
    watched: Watched, tmp_path: Path
) -> None:
    roots = [tmp_path / f"run{i}" / "ch" / "vms" for i in range(20)]
    for root in roots:
        watched.watcher.watch(str(root))

    def mkdir_p_and_bind() -> None:
        for root in roots:
            root.mkdir(parents=True)
            bind(root / "api.sock")

    await asyncio.to_thread(mkdir_p_and_bind)
    socks = {str(root / "api.sock") for root in roots}
    assert await watched.created_until(socks) == socks


async def test_entries_beside_a_missing_root_are_not_reported(
    watched: Watched, tmp_path: Path
) -> None:
    root = tmp_path / "vms"
    watched.watcher.watch(str(root))
    bind(tmp_path / "beside.sock")
    (tmp_path / "other").mkdir()
    root.mkdir()
    await watched.expect(CREATED, bind(root / "sentinel.sock"), is_socket=True)


async def test_deleted_root_gives_rescan_and_is_watched_again_when_recreated(
    watched: Watched, tmp_path: Path
) -> None:
    root = tmp_path / "vms"
    root.mkdir()
    watched.watcher.watch(str(root))
    os.unlink(bind(root / "old.sock"))
    await watched.expect(CREATED, root / "old.sock", is_socket=False)
    await watched.expect(REMOVED, root / "old.sock", is_socket=False)
    root.rmdir()
    await watched.expect(RESCAN, "", is_socket=False)
    root.mkdir()
    await watched.expect(CREATED, bind(root / "new.sock"), is_socket=True)


async def test_root_renamed_away_gives_rescan_and_its_new_place_is_not_watched(
    watched: Watched, tmp_path: Path
) -> None:
    root = tmp_path / "vms"
    root.mkdir()
    watched.watcher.watch(str(root))
    root.rename(tmp_path / "elsewhere")
    await watched.expect(RESCAN, "", is_socket=False)
    bind(tmp_path / "elsewhere" / "stray.sock")
    root.mkdir()
    await watched.expect(CREATED, bind(root / "sentinel.sock"), is_socket=True)


async def test_config_replaced_by_rename_then_edited_in_place(
    watched: Watched, tmp_path: Path
) -> None:
    watched.watcher.watch(str(tmp_path))
    staged, config = tmp_path / "mounts.toml.new", tmp_path / "mounts.toml"
    staged.write_text("[vm]\n")
    os.replace(staged, config)
    assert await watched.collect(4) == [
        FsEvent(CREATED, str(staged), False),
        FsEvent(WRITTEN, str(staged), False),
        FsEvent(REMOVED, str(staged), False),
        FsEvent(CREATED, str(config), False),
    ]
    config.write_text("[vm]\nshares = []\n")
    await watched.expect(WRITTEN, config, is_socket=False)


async def test_deleted_socket_is_removed(watched: Watched, tmp_path: Path) -> None:
    sock = bind(tmp_path / "api.sock")
    watched.watcher.watch(str(tmp_path))
    await watched.expect(CREATED, sock, is_socket=True)
    sock.unlink()
    await watched.expect(REMOVED, sock, is_socket=False)


async def test_deleted_subdirectory_reports_its_entries_removed_without_rescan(
    watched: Watched, tmp_path: Path
) -> None:
    (tmp_path / "vm").mkdir()
    sock = bind(tmp_path / "vm" / "api.sock")
    watched.watcher.watch(str(tmp_path), depth=1)
    await watched.expect(CREATED, sock, is_socket=True)
    sock.unlink()
    (tmp_path / "vm").rmdir()
    await watched.expect(REMOVED, sock, is_socket=False)
    await watched.expect(CREATED, bind(tmp_path / "sentinel.sock"), is_socket=True)


async def test_directory_moved_in_is_scanned(watched: Watched, tmp_path: Path) -> None:
    root = tmp_path / "vms"
    root.mkdir()
    (tmp_path / "staging").mkdir()
    bind(tmp_path / "staging" / "api.sock")
    watched.watcher.watch(str(root), depth=1)
    (tmp_path / "staging").rename(root / "vm")
    await watched.expect(CREATED, root / "vm" / "api.sock", is_socket=True)


async def test_subdirectory_moved_away_gives_rescan(watched: Watched, tmp_path: Path) -> None:
    root = tmp_path / "vms"
    (root / "vm").mkdir(parents=True)
    sock = bind(root / "vm" / "api.sock")
    watched.watcher.watch(str(root), depth=1)
    await watched.expect(CREATED, sock, is_socket=True)
    # Its entries leave without an event of their own: only a rescan tells.
    (root / "vm").rename(tmp_path / "gone")
    await watched.expect(RESCAN, "", is_socket=False)
    bind(tmp_path / "gone" / "stray.sock")
    await watched.expect(CREATED, bind(root / "sentinel.sock"), is_socket=True)


async def test_subdirectory_renamed_within_the_tree_gives_rescan_then_its_new_place(
    watched: Watched, tmp_path: Path
) -> None:
    (tmp_path / "vm-old").mkdir()
    bind(tmp_path / "vm-old" / "api.sock")
    watched.watcher.watch(str(tmp_path), depth=1)
    await watched.expect(CREATED, tmp_path / "vm-old" / "api.sock", is_socket=True)
    (tmp_path / "vm-old").rename(tmp_path / "vm-new")
    # The move-in is handled within the batch, the rescan at its end.
    while (event := await watched.next()).kind is not RESCAN:
        assert event == FsEvent(CREATED, str(tmp_path / "vm-new" / "api.sock"), True)
    await watched.expect(CREATED, tmp_path / "vm-new" / "api.sock", is_socket=True)
    # The moved directory is watched at its new place, and only there.
    await watched.expect(CREATED, bind(tmp_path / "vm-new" / "later.sock"), is_socket=True)


async def test_non_utf8_name_gives_rescan_that_finds_the_socket_of_the_same_batch(
    watched: Watched, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    watched.watcher.watch(str(tmp_path))
    # Both happen before the loop reads: one batch, whose decoding fails at the
    # first name, so the socket's IN_CREATE is lost with it.
    os.close(os.open(os.fsencode(tmp_path) + b"/bad-\xff", os.O_CREAT | os.O_WRONLY))
    sock = bind(tmp_path / "api.sock")
    await watched.expect(RESCAN, "", is_socket=False)
    await watched.expect(CREATED, sock, is_socket=True)
    await watched.expect(CREATED, bind(tmp_path / "sentinel.sock"), is_socket=True)
    assert any("UTF-8" in record.getMessage() for record in caplog.records)


async def test_burst_of_non_utf8_names_gives_few_rescans_and_one_warning(
    watched: Watched, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Each read batch with such a name is lost; one RESCAN per batch made the
    # daemon ping every VM's CH about a hundred times for 3000 names.
    watched.watcher.watch(str(tmp_path))
    middle = tmp_path / "api.sock"

    def churn() -> None:
        for i in range(500):
            bad = os.fsencode(tmp_path) + b"/bad-%d-\xff" % i
            os.close(os.open(bad, os.O_CREAT | os.O_WRONLY))
            os.unlink(bad)
            if i == 250:
                bind(middle)

    with caplog.at_level(logging.WARNING, logger="watcher.inotify"):
        await asyncio.to_thread(churn)
        events = await watched.settled()
    kinds = [event.kind for event in events]
    assert 1 <= kinds.count(RESCAN) <= 3, kinds
    last_rescan = len(kinds) - 1 - kinds[::-1].index(RESCAN)
    assert FsEvent(CREATED, str(middle), True) in events[last_rescan:]
    undecodable = [r.getMessage() for r in caplog.records if "not valid UTF-8" in r.getMessage()]
    assert len(undecodable) == 1, undecodable
    assert "a name in a watched folder" in undecodable[0]
    # A rescan during the burst may also skip a name it cannot watch: once.
    assert len(caplog.records) <= 2, [r.getMessage() for r in caplog.records]


async def test_overflow_gives_rescan_then_what_exists_again(
    watched: Watched, tmp_path: Path
) -> None:
    sock = bind(tmp_path / "api.sock")
    watched.watcher.watch(str(tmp_path))
    await watched.expect(CREATED, sock, is_socket=True)
    overflow = pyinotify._RawEvent(-1, pyinotify.IN_Q_OVERFLOW, 0, "")
    watched.watcher._notifier.append_event(overflow)
    # The injected event waits in pyinotify's queue until the next real read.
    wake = bind(tmp_path / "wake.sock")
    await watched.expect(CREATED, wake, is_socket=True)
    await watched.expect(RESCAN, "", is_socket=False)
    assert await watched.created_until({str(sock), str(wake)}) == {str(sock), str(wake)}


async def test_out_of_watches_is_logged_once_and_retried(
    watched: Watched,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Exhausting fs.inotify.max_user_watches for real would starve the whole
    # host, so add_watch fails with pyinotify's own ENOSPC error twice instead.
    vm = tmp_path / "vm"
    vm.mkdir()
    sock = bind(vm / "api.sock")
    real_add_watch: Callable[..., dict[str, int]] = watched.watcher._wm.add_watch
    failures = 2

    def add_watch(path: str, *args: Any, **kwargs: Any) -> dict[str, int]:
        nonlocal failures
        if path == str(vm) and failures:
            failures -= 1
            raise pyinotify.WatchManagerError(
                f"add_watch: cannot watch {path} WD=-1, Errno=No space left on device (ENOSPC)",
                {path: -1},
            )
        return real_add_watch(path, *args, **kwargs)

    monkeypatch.setattr(watched.watcher._wm, "add_watch", add_watch)
    watched.watcher._retry_delay = 0.01
    with caplog.at_level(logging.INFO, logger="watcher.inotify"):
        watched.watcher.watch(str(tmp_path), depth=1)
        await watched.expect(CREATED, sock, is_socket=True)
    assert failures == 0
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1
    assert "fs.inotify.max_user_watches" in errors[0]
    assert any("available again" in r.getMessage() for r in caplog.records)
    # Armed for real now: later sockets raise events.
    await watched.expect(CREATED, bind(vm / "later.sock"), is_socket=True)


async def test_unwatch_stops_events(watched: Watched, tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    watched.watcher.watch(str(tmp_path / "a"))
    watched.watcher.watch(str(tmp_path / "b"))
    watched.watcher.unwatch(str(tmp_path / "a"))
    bind(tmp_path / "a" / "ignored.sock")
    await watched.expect(CREATED, bind(tmp_path / "b" / "sentinel.sock"), is_socket=True)
    assert len(watched.watcher._wm.watches) == 1, "the kernel watch on a/ was not released"


async def test_close_is_idempotent_and_removes_the_reader(tmp_path: Path) -> None:
    loop = asyncio.get_running_loop()
    watcher = InotifyWatcher(lambda event: None)
    watcher.start(loop)
    watcher.watch(str(tmp_path))
    fd = watcher._fd
    watcher.close()
    watcher.close()
    assert not loop.remove_reader(fd), "the inotify fd is still registered with the loop"
    with pytest.raises(OSError, match="Bad file descriptor"):
        os.fstat(fd)
