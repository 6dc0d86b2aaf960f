"""Directory watches for the daemon: the one module that talks to pyinotify.

pyinotify 0.9.6 is frozen since 2015 and has traps that shape this module
(python-stack.md §1); keeping them behind this small API means swapping the
library later is a local change:

* Its own recursion (``rec``/``auto_add``) misses unix sockets created inside a
  just-created directory (0/300 observed): it synthesises events only for
  regular files and directories. So it is never used here. Every directory is
  armed as "add the watch, THEN scan it": whatever was created before the watch
  existed is found by the scan, whatever comes after raises an event.
* One non-UTF-8 file name makes ``read_events()`` raise ``UnicodeDecodeError``
  and the rest of that batch is lost; ``IN_Q_OVERFLOW`` means the kernel itself
  dropped events. Both become a RESCAN event followed by a full re-arm and
  re-scan, because nothing less tells the consumer the truth. The RESCAN is
  coalesced (one per burst, a moment after its first loss) and the warning
  throttled: 3000 such names created and deleted gave 119 RESCANs and ~340
  warnings when each read batch had its own, and every RESCAN makes the daemon
  ping each VM's CH, so any process writing such names could load them all.
* ``add_watch`` is quiet by default (a negative wd and a log line, so running
  out of watches looks like a missing directory); here it raises, and ENOSPC is
  logged once and retried on a timer rather than losing the watch.
* A new WatchManager per reload leaks inotify instances (#95), so one
  WatchManager and one Notifier live exactly as long as an InotifyWatcher.

Watches are kept in this module's own wd <-> directory maps, not in pyinotify's
Watch objects: pyinotify rewrites ``Watch.path`` for moves it can pair up and
appends "-unknown-path" to the others. A watched directory that moves away is
treated like one deleted, and ancestors of an armed root are not watched, so
renaming an ancestor of a watched directory goes unnoticed.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import os
import re
import stat
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import pyinotify

from .logs import FailureThrottle

log = logging.getLogger("watcher.inotify")

# pyinotify attaches its own stderr handler at import, which duplicates every
# line once the daemon configures logging (§1). Its remaining messages are
# about its own path bookkeeping, which this module does not use (a watched
# directory moved away logs a misleading "cannot be trusted anymore" error), or
# failures that quiet=False turns into exceptions; so it is silenced as well.
_pyinotify_log = logging.getLogger("pyinotify")
_pyinotify_log.handlers.clear()
_pyinotify_log.setLevel(logging.CRITICAL)

# IN_MOVE_SELF: a watched directory renamed away is as gone as a deleted one.
# IN_ONLYDIR: a name that became a file is not armed by mistake.
_MASK = (
    pyinotify.IN_CREATE
    | pyinotify.IN_MOVED_TO
    | pyinotify.IN_MOVED_FROM
    | pyinotify.IN_DELETE
    | pyinotify.IN_DELETE_SELF
    | pyinotify.IN_MOVE_SELF
    | pyinotify.IN_CLOSE_WRITE
    | pyinotify.IN_ONLYDIR
)

_RETRY_AFTER_ENOSPC_S = 10.0

# A burst of lost events (one per read batch) waits this long for the rest of
# the burst, so it ends in one RESCAN; a sustained stream of them gets at most
# one RESCAN per _RESCAN_MIN_INTERVAL_S.
_RESCAN_DELAY_S = 0.1
_RESCAN_MIN_INTERVAL_S = 1.0

# pyinotify reports the errno of a failed add_watch only inside the message:
# "add_watch: cannot watch PATH WD=-1, Errno=No such file or directory (ENOENT)".
_ERRNO_NAME = re.compile(r"\((E[A-Z0-9]+)\)\s*$")


class FsEventKind(enum.Enum):
    CREATED = "created"
    """A non-directory entry appeared: IN_CREATE, IN_MOVED_TO, or found by a scan
    after a watch was (re)armed (so it may be reported more than once)."""
    WRITTEN = "written"
    """IN_CLOSE_WRITE on a non-directory entry: an in-place edit (config files)."""
    REMOVED = "removed"
    """IN_DELETE or IN_MOVED_FROM of a non-directory entry."""
    RESCAN = "rescan"
    """Events may have been lost: forget all state. The watcher re-arms and
    re-scans right after emitting it, so the CREATED events that follow
    describe everything that exists now."""


@dataclass(frozen=True)
class FsEvent:
    kind: FsEventKind
    path: str
    """The entry's path ("" for RESCAN), under the watched directory as given
    to watch() after os.path.abspath + normpath."""
    is_socket: bool
    """lstat S_ISSOCK when the event is handled; False if already gone."""
    scanned: bool = field(default=False, compare=False)
    """Found by a scan, not announced by the kernel: it says what is there, not that
    anything just changed."""


class _Armed(enum.Enum):
    YES = enum.auto()
    MISSING = enum.auto()  # not (or no longer) a directory: its parent's events will tell
    FAILED = enum.auto()  # logged, and retried later when the cause is temporary


class InotifyWatcher:
    """Watches directory trees to a given depth and reports their non-directory entries.

    ``on_event`` is called synchronously from the event loop's reader callback
    (and from watch(), for what the first scan finds): consumers only enqueue
    work in it.
    """

    def __init__(self, on_event: Callable[[FsEvent], None]) -> None:
        self._on_event = on_event
        self._wm = pyinotify.WatchManager()
        # default_proc_fun gets every event (no per-watch proc_fun is ever set);
        # left unset, pyinotify would print every event to stdout.
        self._notifier = pyinotify.Notifier(self._wm, default_proc_fun=self._on_pyinotify_event)
        self._fd: int = self._wm.get_fd()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        self._roots: dict[str, int] = {}  # watched directory -> depth
        self._dirs: dict[int, str] = {}  # wd -> directory, for every watch this module uses
        self._wds: dict[str, int] = {}  # the reverse
        self._rescan_handle: asyncio.TimerHandle | None = None
        self._last_rescan_at: float | None = None  # time.monotonic()
        self._warnings = FailureThrottle()
        self._retry_paths: set[str] = set()
        self._retry_handle: asyncio.TimerHandle | None = None
        self._retry_delay = _RETRY_AFTER_ENOSPC_S
        self._out_of_watches = False

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Read events from ``loop`` (never a blocking ``Notifier.loop()`` thread)."""
        if self._closed or self._loop is not None:
            raise RuntimeError("InotifyWatcher.start() called twice or after close()")
        self._loop = loop
        loop.add_reader(self._fd, self._on_readable)

    def watch(self, directory: str, depth: int = 0) -> None:
        """Report the entries of ``directory`` and its subdirectories down to ``depth``.

        Depth 0 is the directory alone, depth 1 adds each subdirectory (existing
        or created later), and so on. What exists already is reported at once
        as CREATED. A directory that does not exist yet is waited for by
        watching its nearest existing ancestor, so ``mkdir -p`` chains work.
        Watching a directory again keeps the deeper of the two depths.
        """
        if depth < 0:
            raise ValueError(f"depth must be >= 0, not {depth}")
        if self._loop is None or self._closed:
            raise RuntimeError("InotifyWatcher.watch() needs start() first, and no close()")
        root = os.path.normpath(os.path.abspath(directory))
        if not _encodable(root):
            log.error("cannot watch %r: pyinotify needs paths valid in UTF-8", root)
            return
        if self._roots.get(root, -1) >= depth:
            return
        self._roots[root] = depth
        self._arm_root(root)
        self._drop_unused_watches()

    def unwatch(self, directory: str) -> None:
        """Stop reporting ``directory``; its watches go unless another root needs them."""
        root = os.path.normpath(os.path.abspath(directory))
        if self._roots.pop(root, None) is not None and not self._closed:
            self._drop_unused_watches()

    def close(self) -> None:
        """Remove the reader, cancel a pending retry and close the inotify fd."""
        if self._closed:
            return
        self._closed = True
        if self._rescan_handle is not None:
            self._rescan_handle.cancel()
            self._rescan_handle = None
        if self._retry_handle is not None:
            self._retry_handle.cancel()
            self._retry_handle = None
        if self._loop is not None:
            self._loop.remove_reader(self._fd)
        self._notifier.stop()

    # ---- reading events ----------------------------------------------------

    def _on_readable(self) -> None:
        try:
            self._notifier.read_events()
        except UnicodeDecodeError as err:
            # pyinotify decodes names as strict UTF-8; the events before the bad
            # name were queued, the bad one and the rest of the batch are lost.
            # err.object is the raw name, NUL-padded by the kernel.
            self._warn_throttled(
                "undecodable-name",
                "a name in a watched folder is not valid UTF-8 (%r): pyinotify cannot decode "
                "it, so the rest of its batch of events was lost and the folders are rescanned",
                err.object.rstrip(b"\0"),
            )
            self._schedule_rescan()
        self._notifier.process_events()

    def _on_pyinotify_event(self, event: pyinotify.Event) -> None:
        mask: int = event.mask
        if mask & pyinotify.IN_Q_OVERFLOW:
            # wd -1, no .path: only this default handler ever sees it (§1).
            self._warn_throttled(
                "queue-overflow",
                "the inotify queue overflowed: events were lost, the folders are rescanned",
            )
            self._schedule_rescan()
            return
        directory = self._dirs.get(event.wd)
        if directory is None:
            return  # a watch this module already dropped
        if mask & (pyinotify.IN_DELETE_SELF | pyinotify.IN_MOVE_SELF | pyinotify.IN_IGNORED):
            # IN_IGNORED reaches here only when the kernel dropped a watch this
            # module still uses without IN_DELETE_SELF first (an unmount).
            self._directory_gone(directory, children_reported=bool(mask & pyinotify.IN_DELETE_SELF))
            return
        path = os.path.join(directory, event.name)
        if mask & pyinotify.IN_ISDIR:
            if mask & (pyinotify.IN_CREATE | pyinotify.IN_MOVED_TO):
                self._directory_appeared(path)
            # A watched subdirectory deleted or moved away is handled by its own
            # IN_DELETE_SELF or IN_MOVE_SELF; the former comes before the
            # parent's IN_DELETE (§1).
            return
        if self._depth_left(directory) is None:
            return  # an ancestor waited on for a missing root: only directories matter
        if mask & (pyinotify.IN_CREATE | pyinotify.IN_MOVED_TO):
            self._emit(FsEventKind.CREATED, path)
        elif mask & pyinotify.IN_CLOSE_WRITE:
            self._emit(FsEventKind.WRITTEN, path)
        elif mask & (pyinotify.IN_DELETE | pyinotify.IN_MOVED_FROM):
            self._emit(FsEventKind.REMOVED, path)

    def _directory_appeared(self, path: str) -> None:
        waiting = [
            root
            for root in self._roots
            if root not in self._wds and _levels_below(root, path) is not None
        ]
        for root in waiting:
            self._arm_root(root)
        if waiting:
            self._drop_unused_watches()
        if path not in waiting and self._depth_left(path) is not None:
            self._arm_tree(path)

    def _directory_gone(self, path: str, *, children_reported: bool) -> None:
        """Forget the watches of a directory that was deleted or moved away.

        A deleted directory was emptied first, and the kernel reported each
        entry; one moved away takes its entries with it silently, so the
        consumer must rescan. Losing a watched root always means a rescan.
        """
        in_tree = self._depth_left(path) is not None
        for wd, watched in list(self._dirs.items()):
            if _levels_below(watched, path) is not None:
                self._forget(wd)
        if path in self._roots or (in_tree and not children_reported):
            self._schedule_rescan()  # re-arms every root, this one included
        elif any(root not in self._wds for root in self._roots):
            for root in self._roots:
                if root not in self._wds:
                    self._arm_root(root)
            self._drop_unused_watches()

    def _warn_throttled(self, key: str, message: str, *args: object) -> None:
        """Log the first warning of a kind, then one a minute with a count of those held back.

        Any process that can write in a watched folder can make these happen
        in a loop; the key alone is the signature, so varying names do not
        defeat the throttle.
        """
        held_back = self._warnings.admit(key, key, time.monotonic())
        if held_back is None:
            return
        if held_back:
            log.warning(message + " (%d more since the last report)", *args, held_back)
        else:
            log.warning(message, *args)

    def _schedule_rescan(self) -> None:
        """Rescan soon, once for however many losses come before it.

        Nothing already read is held back: the events that still arrive are
        reported at once, and the RESCAN that follows supersedes them.
        """
        if self._rescan_handle is not None or self._loop is None:
            return
        delay = _RESCAN_DELAY_S
        if self._last_rescan_at is not None:
            next_allowed = self._last_rescan_at + _RESCAN_MIN_INTERVAL_S
            delay = max(delay, next_allowed - time.monotonic())
        self._rescan_handle = self._loop.call_later(delay, self._rescan_all)

    def _rescan_all(self) -> None:
        self._rescan_handle = None
        self._last_rescan_at = time.monotonic()
        self._emit(FsEventKind.RESCAN, "")
        # Start from nothing: re-adding a watch that still exists returns its
        # wd, and whatever is not re-added is dropped afterwards.
        self._dirs.clear()
        self._wds.clear()
        for root in sorted(self._roots):
            self._arm_root(root)
        self._drop_unused_watches()

    def _emit(self, kind: FsEventKind, path: str, *, scanned: bool = False) -> None:
        self._on_event(FsEvent(kind, path, bool(path) and _is_socket(path), scanned))

    # ---- arming watches ------------------------------------------------------

    def _arm_root(self, root: str) -> None:
        """Arm ``root``, or wait for it on its nearest existing ancestor.

        Walks down from that ancestor one level at a time, adding each watch
        BEFORE looking for the next level, so a directory created in between
        raises an event instead of being missed.
        """
        path = root
        while not os.path.isdir(path):
            path = os.path.dirname(path)
        while True:
            armed = self._arm_tree(path) if path == root else self._add_watch(path)
            if armed is _Armed.MISSING and path != os.path.dirname(path):
                path = os.path.dirname(path)  # removed since isdir(): wait one level up
                continue
            if armed is not _Armed.YES or path == root:
                return
            step = _one_level_towards(path, root)
            if not os.path.isdir(step):
                return
            path = step

    def _arm_tree(self, directory: str) -> _Armed:
        """Add the watch, THEN scan: report entries, arm subdirectories within depth."""
        armed = self._add_watch(directory)
        if armed is not _Armed.YES:
            return armed
        try:
            with os.scandir(directory) as scan:
                entries = list(scan)
        except (FileNotFoundError, NotADirectoryError):
            return armed  # removed meanwhile: its IN_DELETE_SELF follows
        except OSError as err:
            log.error("cannot list %s: %s", directory, err)
            return armed
        for entry in entries:
            if not _encodable(entry.path):
                self._warn_throttled(
                    "unencodable-path",
                    "skipping %r: pyinotify needs names valid in UTF-8",
                    entry.path,
                )
                continue
            try:
                is_dir = entry.is_dir(follow_symlinks=False)
            except OSError:
                continue  # removed meanwhile
            if not is_dir:
                self._emit(FsEventKind.CREATED, entry.path, scanned=True)
            elif self._depth_left(entry.path) is not None:
                self._arm_tree(entry.path)
        return armed

    def _add_watch(self, directory: str) -> _Armed:
        if not _encodable(directory):
            # pyinotify would raise UnicodeEncodeError from deep inside (#201).
            self._warn_throttled(
                "unencodable-path", "skipping %r: pyinotify needs names valid in UTF-8", directory
            )
            return _Armed.FAILED
        try:
            # str(), never a pathlib object: add_watch(Path) silently watches nothing (#187).
            wd: int = self._wm.add_watch(str(directory), _MASK, quiet=False)[directory]
        except pyinotify.WatchManagerError as err:
            found = _ERRNO_NAME.search(str(err))
            code = found.group(1) if found else ""
            if code in ("ENOENT", "ENOTDIR"):
                return _Armed.MISSING
            if code == "ENOSPC":
                self._retry_later(directory)
            else:
                log.error("cannot watch %s: %s", directory, err)
            return _Armed.FAILED
        # Keep the maps one-to-one. The kernel returns the existing wd for an
        # inode already watched: a directory renamed here, whose IN_MOVE_SELF
        # (queued after this IN_MOVED_TO) then finds it under its new name and
        # rescans. A directory recreated at a known path gets a new wd.
        self._forget_mapping(self._wds.get(directory))
        self._forget_mapping(wd)
        self._dirs[wd] = directory
        self._wds[directory] = wd
        return _Armed.YES

    def _retry_later(self, directory: str) -> None:
        self._retry_paths.add(directory)
        if not self._out_of_watches:
            self._out_of_watches = True
            log.error(
                "out of inotify watches (ENOSPC) at %s: raise the sysctl "
                "fs.inotify.max_user_watches; retrying every %g s until it is watched",
                directory,
                self._retry_delay,
            )
        if self._retry_handle is None and self._loop is not None:
            self._retry_handle = self._loop.call_later(self._retry_delay, self._retry_watches)

    def _retry_watches(self) -> None:
        self._retry_handle = None
        paths = sorted(self._retry_paths)  # parents before their subdirectories
        self._retry_paths.clear()
        for root in sorted(self._roots):
            if root not in self._wds:
                self._arm_root(root)
        for path in paths:
            if path not in self._wds and self._depth_left(path) is not None:
                self._arm_tree(path)
        self._drop_unused_watches()
        if not self._retry_paths and self._out_of_watches:
            self._out_of_watches = False
            log.info("inotify watches are available again: every directory is watched")

    # ---- dropping watches ----------------------------------------------------

    def _drop_unused_watches(self) -> None:
        """Remove watches no root needs any more, and any pyinotify still holds for nothing."""
        waiting_on = self._waiting_points()
        for wd, directory in list(self._dirs.items()):
            if directory not in waiting_on and self._depth_left(directory) is None:
                self._forget(wd)
        for wd in list(self._wm.watches):
            if wd not in self._dirs:
                self._remove_watch(wd)

    def _waiting_points(self) -> set[str]:
        """The deepest watched ancestor of each root that is not armed yet."""
        points = set()
        for root in self._roots:
            if root in self._wds:
                continue
            path = root
            while path != os.path.dirname(path):
                path = os.path.dirname(path)
                if path in self._wds:
                    points.add(path)
                    break
        return points

    def _forget(self, wd: int) -> None:
        self._forget_mapping(wd)
        self._remove_watch(wd)

    def _forget_mapping(self, wd: int | None) -> None:
        directory = self._dirs.pop(wd, None) if wd is not None else None
        if directory is not None:
            del self._wds[directory]

    def _remove_watch(self, wd: int) -> None:
        # Failing means the kernel dropped it already; pyinotify forgets it on IN_IGNORED.
        with contextlib.suppress(pyinotify.WatchManagerError):
            self._wm.rm_watch(wd, quiet=False)

    # ---- depth bookkeeping ---------------------------------------------------

    def _depth_left(self, directory: str) -> int | None:
        """How many levels below ``directory`` are still watched (None: not inside any root)."""
        best: int | None = None
        for root, depth in self._roots.items():
            below = _levels_below(directory, root)
            if below is not None and below <= depth and (best is None or depth - below > best):
                best = depth - below
        return best


def _levels_below(path: str, ancestor: str) -> int | None:
    """0 for the ancestor itself, 1 for its children, ...; None if ``path`` is outside it."""
    if path == ancestor:
        return 0
    prefix = ancestor.rstrip("/") + "/"
    if not path.startswith(prefix):
        return None
    return path[len(prefix) :].count("/") + 1


def _one_level_towards(path: str, descendant: str) -> str:
    prefix = path.rstrip("/") + "/"
    return prefix + descendant[len(prefix) :].split("/", 1)[0]


def _encodable(path: str) -> bool:
    """False for names os.scandir surrogate-escaped; pyinotify encodes paths strictly."""
    try:
        path.encode(sys.getfilesystemencoding())
    except UnicodeEncodeError:
        return False
    return True


def _is_socket(path: str) -> bool:
    try:
        return stat.S_ISSOCK(os.lstat(path).st_mode)
    except OSError:
        return False
