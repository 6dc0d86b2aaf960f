"""The host-side pieces of one managed share: listener, virtiofsd process, registry file, log FIFO.

Each piece is shaped by the requirement that a daemon restart neither kills a virtiofsd that serves
a VM nor leaves one running unsupervised (see ``watcher.backends`` for the whole design):

* The listener stays **blocking** and is never registered with the event loop: virtiofsd inherits
  the same open file description, and O_NONBLOCK on it would make virtiofsd's accept() fail with
  EAGAIN. It is chmod 0600 between bind and listen (Cloud Hypervisor runs as root, and no connect
  can succeed before listen, so the default mode is never exposed).
* The process is started with ``os.posix_spawn`` in a session of its own, not with
  ``subprocess.Popen``: a Popen object owns the reaping, warns when dropped while its child lives
  and hands it to a module-level list that reaps it later, but dropping live children is exactly
  what daemon shutdown does here. A bare pid plus a pidfd is the same model for a process we
  started and one we adopt from a previous daemon: the pidfd becomes readable when the process
  exits, whether or not it is our child.
* The registry file records pid and start time (/proc/<pid>/stat field 22), because a pid alone
  may name an unrelated process after a reboot or pid wrap-around.
* The log FIFO is opened O_RDWR on both ends: the child's end makes it a reader of its own pipe,
  so a virtiofsd never gets SIGPIPE/EPIPE while no daemon reads; the daemon's end makes it a writer,
  so the daemon never sees end-of-file (which would keep the fd readable and spin the loop) when a
  virtiofsd exits. While no daemon reads, a virtiofsd can write one pipe buffer (64 KiB, several
  hundred of its lines) before its writes block; it writes a handful of lines per VM boot.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .backends_virtiofsd import LISTENER_FD, BackendError

LISTEN_BACKLOG = 16
"""A VM connects once per boot; the backlog only has to hold it until the next virtiofsd starts."""

MAX_LINE = 4096
"""A longer run of output without a newline is logged in pieces rather than buffered forever."""

_SYSTEMD_ENV = ("NOTIFY_SOCKET", "WATCHDOG_PID", "WATCHDOG_USEC", "LISTEN_FDS", "LISTEN_PID")
"""The daemon's systemd hand-offs: a child must not be able to notify systemd on its behalf."""


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
                f"{path} exists and is not a socket (remove it, or give the share another socket)"
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


def start_ticks(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (/proc/<pid>/stat field 22), or None.

    The command name (field 2) may hold spaces and parentheses, so fields are counted from the
    last ')'.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as file:
            text = file.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = text[text.rindex(b")") + 2 :].split()
    return int(fields[22 - 3])


@dataclass(frozen=True)
class ExitStatus:
    """How a virtiofsd ended; code and signal are both None when it was not our child."""

    code: int | None = None
    signal: int | None = None

    @property
    def clean(self) -> bool:
        """rc 0 is virtiofsd's "Client disconnected, shutting down" (virtiofsd.md §2)."""
        return self.code == 0

    def __str__(self) -> str:
        if self.signal is not None:
            return f"killed by {signal.Signals(self.signal).name}"
        if self.code is not None:
            return f"rc {self.code}"
        return "ended (status unknown: started by an earlier daemon)"


class BackendProcess:
    """A running virtiofsd, known by pid, start time and pidfd; started by us or adopted."""

    def __init__(self, pid: int, pidfd: int, ticks: int) -> None:
        self.pid = pid
        self.ticks = ticks
        self._pidfd = pidfd
        self.exited = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(pidfd, self._on_exit)

    def _on_exit(self) -> None:
        self._loop.remove_reader(self._pidfd)
        self.exited.set()

    @classmethod
    def spawn(cls, argv: Sequence[str], listener: socket.socket, log_path: str) -> BackendProcess:
        """Start ``argv`` in its own session with the listener as fd 3 and the FIFO as stdout/err.

        Its own session (and so process group) lets us signal everything it forks (the legacy
        virtiofsd's namespace sandbox runs its worker as a child) and keeps it apart from the
        daemon's group, so a daemon exit does not take it down; no PR_SET_PDEATHSIG for the same
        reason. SIGPIPE and SIGXFSZ go back to their defaults because Python ignores them and
        exec keeps an ignored signal ignored (``subprocess`` resets them for the same reason).
        """
        output = os.open(log_path, os.O_RDWR | os.O_CLOEXEC)
        try:
            # The daemon's stdio is open (systemd connects it), so both descriptors are >= 3 and
            # the dup2s below cannot overwrite each other's source. dup2(fd, fd) clears
            # FD_CLOEXEC in glibc >= 2.29, so a listener that happens to be fd 3 is inherited too.
            actions: list[tuple[int, ...] | tuple[int, int, str, int, int]] = [
                (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                (os.POSIX_SPAWN_DUP2, output, 1),
                (os.POSIX_SPAWN_DUP2, output, 2),
                (os.POSIX_SPAWN_DUP2, listener.fileno(), LISTENER_FD),
            ]
            actions += [(os.POSIX_SPAWN_CLOSE, fd) for fd in _inheritable_fds() if fd > 3]
            env = {k: v for k, v in os.environ.items() if k not in _SYSTEMD_ENV}
            pid = os.posix_spawn(
                argv[0],
                list(argv),
                env,
                file_actions=actions,
                setsid=True,
                setsigdef=(signal.SIGPIPE, signal.SIGXFSZ),
                setsigmask=(),
            )
        finally:
            os.close(output)
        # Our child cannot be reaped (and its pid reused) before we wait for it: both are safe.
        ticks = start_ticks(pid)
        assert ticks is not None
        return cls(pid, os.pidfd_open(pid), ticks)

    @classmethod
    def adopt(cls, pid: int, ticks: int) -> BackendProcess | None:
        """The process a registry names, if it still runs; None if it is gone or its pid reused.

        The pidfd is opened first and the start time checked after: a match then proves the pidfd
        names the recorded process, since its pid could not have been reused while it lived.
        """
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            return None
        if start_ticks(pid) != ticks:
            os.close(pidfd)
            return None
        return cls(pid, pidfd, ticks)

    def signal_group(self, sig: int) -> None:
        """Signal the process and everything it forked, unless it has already ended.

        The start time is checked again first: a process started by an earlier daemon is not our
        child, and once its parent (init) reaps it, its pid and group id may name a stranger.
        """
        if self.exited.is_set() or start_ticks(self.pid) != self.ticks:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, sig)

    def reap(self) -> ExitStatus:
        """Collect the exit status after ``exited``; unknown for a process we did not start.

        Before reaping our own child, whatever is left of its process group gets SIGKILL: the
        sandbox child of a virtiofsd normally dies with its monitor (PR_SET_PDEATHSIG, virtiofsd.md
        §2), and one that did not would be a second virtiofsd on the listener. The unreaped leader
        still holds the group id, so the signal cannot reach a stranger.
        """
        try:
            peek = os.waitid(os.P_PIDFD, self._pidfd, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return ExitStatus()
        if peek is None:
            return ExitStatus()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL)
        result = os.waitid(os.P_PIDFD, self._pidfd, os.WEXITED | os.WNOHANG)
        if result is None:
            return ExitStatus()
        if result.si_code == os.CLD_EXITED:
            return ExitStatus(code=result.si_status)
        return ExitStatus(signal=result.si_status)

    def close(self) -> None:
        """Stop watching; the process itself is left alone."""
        if not self.exited.is_set():
            self._loop.remove_reader(self._pidfd)
        os.close(self._pidfd)


def _inheritable_fds() -> list[int]:
    """Descriptors the daemon itself inherited without close-on-exec: not for virtiofsd."""
    found = []
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # the listing's own descriptor is already closed
            if os.get_inheritable(int(name)):
                found.append(int(name))
    return found


@dataclass(frozen=True)
class Registration:
    """What a daemon needs to find the virtiofsd of a share after a restart."""

    pid: int
    start_ticks: int
    socket: str
    argv: tuple[str, ...]


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
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


class OutputFifo:
    """Reads virtiofsd's stdout and stderr from a FIFO, one complete line at a time."""

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

    def drain(self) -> None:
        """Pass on every complete line the pipe holds now."""
        while True:
            try:
                chunk = os.read(self._fd, 65536)
            except BlockingIOError:
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
        """Stop reading; the FIFO stays for the virtiofsd still writing to it."""
        self._loop.remove_reader(self._fd)
        os.close(self._fd)
