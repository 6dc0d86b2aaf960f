"""One `run` daemon per runtime_dir: an exclusive lock on ``<runtime_dir>/.daemon.lock``.

Why: two daemons on one config would both attach every share (one of them
always loses with a duplicate id) and both supervise every managed
virtiofsd, binding listeners and starting backends on the same sockets. So
`run` takes this lock before it touches a VM or a backend, and a second
daemon exits at once saying which pid holds it.

Why in ``[backend] runtime_dir``: that folder is what two fighting daemons
share, since the managed virtiofsd sockets and their registry records live
there, and by default it is the unit's ``RuntimeDirectory=`` (tmpfs, root's,
writable under the sandbox). A ``.daemon.lock`` cannot be mistaken for a
VM's ``<runtime_dir>/<vm>/`` folder: VM names start with a letter or digit
(apisocket.VM_NAME_RE). A reload that changes ``runtime_dir`` moves nothing:
``[backend]`` changes apply only after a restart, and so does the lock.

Why ``flock`` and not a pid file checked with ``kill(pid, 0)``: the kernel
drops the lock when the holder exits, crash and SIGKILL included, so there is
no stale state to judge and no pid-reuse race. ``flock`` belongs to the open
file description, so unlike a POSIX record lock it is not lost when some
other descriptor of the same file is closed. The pid written into the file
only serves the error message.

Why O_CLOEXEC matters: managed virtiofsd processes are started by the daemon
and outlive it by design (backends_process.py). A child that inherited this
descriptor would keep the lock held after the daemon exits, and the next
daemon could never start. They are started with ``posix_spawn``, so exec
closes a close-on-exec descriptor.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from types import TracebackType

LOCK_NAME = ".daemon.lock"
FOLDER_MODE = 0o755
FILE_MODE = 0o644
"""World-readable so that a `run` by a user who cannot take the lock still learns who holds it.
Set explicitly because the unit's UMask=0077 would otherwise make it private."""


def lock_path(runtime_dir: str) -> str:
    return os.path.join(runtime_dir, LOCK_NAME)


class LockHeld(Exception):
    """Another process holds the lock; ``pid`` is what it wrote, None if it wrote nothing yet."""

    def __init__(self, path: str, pid: int | None) -> None:
        super().__init__(f"{path} is held by pid {pid if pid is not None else '?'}")
        self.path = path
        self.pid = pid


class LockUnavailable(Exception):
    """The lock file cannot be created or opened; ``fix`` says what to change."""

    def __init__(self, path: str, error: OSError) -> None:
        super().__init__(f"{path}: {error.strerror or error}")
        self.path = path
        self.reason = error.strerror or str(error)
        if error.errno in (errno.EACCES, errno.EPERM):
            self.fix = "run it as root, or set [backend] runtime_dir to a folder you can write"
        elif error.errno in (errno.EEXIST, errno.ENOTDIR):
            self.reason = f"a file is in the way of the folder {os.path.dirname(path)}"
            self.fix = "remove that file, or set [backend] runtime_dir to a folder"
        else:
            self.fix = "set [backend] runtime_dir to a writable folder"


class DaemonLock:
    """The held lock; ``close()`` (or leaving the ``with`` block, or exiting) releases it."""

    def __init__(self, path: str, fd: int) -> None:
        self.path = path
        self._fd = fd

    @classmethod
    def acquire(cls, runtime_dir: str) -> DaemonLock:
        """Take the lock without waiting; LockHeld or LockUnavailable when that is not possible."""
        path = lock_path(runtime_dir)
        try:
            if not os.path.isdir(runtime_dir):
                os.makedirs(runtime_dir, mode=FOLDER_MODE, exist_ok=True)
                os.chmod(runtime_dir, FOLDER_MODE)  # makedirs' mode is filtered by the umask
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
        except PermissionError as exc:
            _raise_if_held(path)
            raise LockUnavailable(path, exc) from None
        except OSError as exc:
            raise LockUnavailable(path, exc) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _holder(fd)
            os.close(fd)
            raise LockHeld(path, pid) from None
        except OSError as exc:
            os.close(fd)
            raise LockUnavailable(path, exc) from None
        # Only for the message a second daemon prints: the lock is held either way, so a
        # failed write (a full tmpfs) must not stop the daemon.
        with contextlib.suppress(OSError):
            os.fchmod(fd, FILE_MODE)
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        return cls(path, fd)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> DaemonLock:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _raise_if_held(path: str) -> None:
    """A user who may not write the lock file (it is root's) may still read it: if a daemon
    holds it, say that rather than "permission denied"."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise LockHeld(path, _holder(fd)) from None
    except OSError:
        return
    finally:
        os.close(fd)


def _holder(fd: int) -> int | None:
    """The pid the holder wrote; None between its flock and its write, or if unreadable."""
    try:
        text = os.pread(fd, 32, 0).decode("ascii").strip()
        return int(text) if text else None
    except (OSError, ValueError):
        return None
