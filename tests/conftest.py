"""Fixtures for end-to-end tests: a throwaway "host" with CH doubles, backends and the daemon."""

from __future__ import annotations

import shutil
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
