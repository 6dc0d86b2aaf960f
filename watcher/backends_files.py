"""The files of one managed share: its listening socket, its registry file and its log FIFO.

Each is shaped by the rule that a daemon restart neither cuts a VM's connection nor leaves a
virtiofsd running unsupervised (the design is in ``watcher.backends``):

* The listener stays **blocking** and is never registered with the event loop: virtiofsd inherits
  the same open file description, and O_NONBLOCK on it would make virtiofsd's accept() fail with
  EAGAIN. It is chmod 0600 between bind and listen: Cloud Hypervisor runs as root, and no connect
  succeeds before listen, so the looser default mode is never usable.
* The registry file ``<runtime_dir>/<vm>/<tag>.json`` records pid and start time, because a pid
  alone may name an unrelated process after pid wrap-around.
* The log FIFO ``<runtime_dir>/<vm>/<tag>.log`` is opened O_RDWR at both ends. virtiofsd's end
  makes it a reader of its own pipe, so it never gets SIGPIPE/EPIPE while no daemon reads; the
  daemon's end makes it a writer, so the daemon never sees end-of-file when a virtiofsd exits
  (a FIFO at EOF stays readable and would spin the event loop). While no daemon reads, a
  virtiofsd can write one pipe buffer (64 KiB, hundreds of lines) before its writes block; it
  writes a handful per VM boot.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import stat
from collections.abc import Callable
from dataclasses import dataclass

from .backends_virtiofsd import BackendError

LISTEN_BACKLOG = 16
"""A VM connects once per boot; the backlog only holds that connect until a virtiofsd accepts."""

MAX_LINE = 4096
"""A longer run of output without a newline is logged in pieces rather than buffered forever."""


@dataclass(frozen=True)
class SharePaths:
    """Where one share's socket, registry file and log FIFO live."""

    socket: str
    registry: str
    fifo: str

    @classmethod
    def of(cls, runtime_dir: str, vm: str, tag: str, socket_path: str) -> SharePaths:
        folder = os.path.join(runtime_dir, vm)
        return cls(
            socket_path, os.path.join(folder, f"{tag}.json"), os.path.join(folder, f"{tag}.log")
        )

    def remove(self) -> None:
        """Remove all three (and a registry write a crash left half done), then the VM's
        folder if no other share uses it."""
        unlink_socket(self.socket)
        for path in (self.registry, f"{self.registry}.tmp", self.fifo):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        with contextlib.suppress(OSError):
            os.rmdir(os.path.dirname(self.registry))


def bind_listener(path: str) -> socket.socket:
    """Bind and listen at ``path``, replacing a stale socket file without connecting to it.

    Probing the file with a connect is never safe: the probe would become the one frontend a
    waiting virtiofsd serves (virtiofsd.md §2). Anything that is not a socket is left alone.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise BackendError(
                f"{path} exists and is not a socket (remove it and reload, or give the share"
                " another socket)"
            )
        os.unlink(path)
    os.makedirs(os.path.dirname(path) or ".", mode=0o755, exist_ok=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(path)
        os.chmod(path, 0o600)
        listener.listen(LISTEN_BACKLOG)
    except BaseException:
        listener.close()
        raise
    return listener


def unlink_socket(path: str) -> None:
    """Remove ``path`` if it is a socket; a file someone put there instead is not ours."""
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)


@dataclass(frozen=True)
class Registration:
    """What a later daemon needs to find, check and stop a share's virtiofsd, and to go on
    supervising it when its share has left the configuration but a VM still uses it."""

    pid: int
    start_ticks: int
    socket: str
    argv: tuple[str, ...]
    shared_dir: str
    readonly: bool
    cache: str


def write_registration(path: str, record: Registration) -> None:
    """Replace the registry file atomically, so a restarting daemon never reads half of it."""
    temporary = f"{path}.tmp"
    with open(temporary, "w", encoding="utf-8") as file:
        json.dump(
            {
                "pid": record.pid,
                "start_ticks": record.start_ticks,
                "socket": record.socket,
                "argv": list(record.argv),
                "shared_dir": record.shared_dir,
                "readonly": record.readonly,
                "cache": record.cache,
            },
            file,
        )
    os.replace(temporary, path)


def read_registration(path: str) -> Registration | None:
    """The registry file's record; None when it is missing or unreadable: nothing to adopt."""
    try:
        with open(path, encoding="utf-8") as file:
            document = json.load(file)
        return Registration(
            pid=int(document["pid"]),
            start_ticks=int(document["start_ticks"]),
            socket=str(document["socket"]),
            argv=tuple(str(arg) for arg in document["argv"]),
            shared_dir=str(document["shared_dir"]),
            readonly=bool(document["readonly"]),
            cache=str(document["cache"]),
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


def registrations(runtime_dir: str) -> list[tuple[str, str, Registration]]:
    """(vm, tag, record) of every readable registry file under ``runtime_dir``."""
    found = []
    with contextlib.suppress(FileNotFoundError):
        for vm in sorted(os.listdir(runtime_dir)):
            folder = os.path.join(runtime_dir, vm)
            if not os.path.isdir(folder):
                continue
            for name in sorted(os.listdir(folder)):
                tag, dot, extension = name.rpartition(".")
                if not dot or extension != "json":
                    continue  # never open the FIFOs here: a read-only open blocks
                record = read_registration(os.path.join(folder, name))
                if record is not None:
                    found.append((vm, tag, record))
    return found


class OutputFifo:
    """Reads virtiofsd's stdout and stderr from the share's FIFO, one complete line at a time."""

    def __init__(self, path: str, on_line: Callable[[str], None]) -> None:
        self.path = path
        self._on_line = on_line
        self._partial = b""
        try:
            is_fifo = stat.S_ISFIFO(os.lstat(path).st_mode)
        except FileNotFoundError:
            is_fifo = False
        if not is_fifo:
            # An existing FIFO is kept: a virtiofsd adopted from the previous daemon writes to it.
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            os.mkfifo(path, 0o600)
        self._fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self._fd, self.drain)

    def writer(self) -> int:
        """A new blocking descriptor for a virtiofsd's stdout and stderr; the caller closes it."""
        return os.open(self.path, os.O_RDWR | os.O_CLOEXEC)

    def drain(self) -> None:
        """Pass on every complete line the pipe holds now."""
        while True:
            try:
                chunk = os.read(self._fd, 65536)
            except BlockingIOError:
                return
            if not chunk:  # cannot happen while we hold a write end, but must not spin
                return
            lines = (self._partial + chunk).split(b"\n")
            self._partial = lines.pop()
            while len(self._partial) > MAX_LINE:
                lines.append(self._partial[:MAX_LINE])
                self._partial = self._partial[MAX_LINE:]
            for line in lines:
                self._on_line(line.decode(errors="replace").rstrip())

    def flush(self) -> None:
        """Drain, then pass on an unfinished last line: its writer has exited."""
        self.drain()
        if self._partial:
            partial, self._partial = self._partial, b""
            self._on_line(partial.decode(errors="replace").rstrip())

    def close(self) -> None:
        """Stop reading; the FIFO stays for a virtiofsd still writing to it."""
        self._loop.remove_reader(self._fd)
        os.close(self._fd)
