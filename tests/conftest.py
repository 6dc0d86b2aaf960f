"""Fixtures for end-to-end tests: a throwaway "host" with CH doubles, backends and the daemon."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tests.support import Host


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A temp folder with a short path: unix socket paths must stay under 108 bytes,
    and pytest's tmp_path (which holds the test name) can exceed that."""
    path = Path(tempfile.mkdtemp(prefix="vr-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
async def host(short_tmp: Path) -> AsyncIterator[Host]:
    h = Host(short_tmp)
    try:
        yield h
    finally:
        await h.cleanup()


@pytest.fixture(scope="session", autouse=True)
def nothing_left_running() -> Iterator[None]:
    """After the whole run, no virtiofsd, CH double or daemon of a test may still run.

    Each test cleans up after itself; this catches one that did not, which on a CI machine
    would otherwise go unnoticed (and, for a virtiofsd, keep its folder busy)."""
    yield
    left = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            ours = any(b"/tmp/vr-" in arg or b"/pytest-of-" in arg for arg in argv)
            kind = argv[0].endswith(b"virtiofsd") or b"watcher" in b" ".join(argv)
            if ours and kind and int(entry) != os.getpid():
                left[int(entry)] = b" ".join(argv).decode(errors="replace")
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    assert not left, f"processes left running after the tests: {left}"
