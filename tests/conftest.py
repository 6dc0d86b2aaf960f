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

_SHORT_TMPS: list[bytes] = []
"""The short_tmp folders of this run: what nothing_left_running looks for."""


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A temp folder with a short path: unix socket paths must stay under 108 bytes,
    and pytest's tmp_path (which holds the test name) can exceed that."""
    path = Path(tempfile.mkdtemp(prefix="vr-", dir="/tmp"))
    _SHORT_TMPS.append(os.fsencode(path))
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
def nothing_left_running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """After the whole run, no virtiofsd, CH double or daemon of a test may still run.

    Each test cleans up after itself; this catches one that did not, which on a CI machine
    would otherwise go unnoticed (and, for a virtiofsd, keep its folder busy). Only processes
    that name this run's own temp folders count: another run on the machine is not ours."""
    yield
    folders = [os.fsencode(tmp_path_factory.getbasetemp()), *_SHORT_TMPS]
    left = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            ours = any(folder in arg for arg in argv for folder in folders)
            kind = argv[0].endswith(b"virtiofsd") or b"watcher" in b" ".join(argv)
            if ours and kind and int(entry) != os.getpid():
                left[int(entry)] = b" ".join(argv).decode(errors="replace")
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    assert not left, f"processes left running after the tests: {left}"
