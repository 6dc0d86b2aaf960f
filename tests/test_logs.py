"""Log lines: key=value fields, journald priority prefixes, and the failure throttle."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from watcher.logs import REPEAT_INTERVAL, FailureThrottle, kv, setup_logging


def test_kv_quotes_only_what_needs_quoting() -> None:
    line = kv("attach failed", vm="web01", reason='no "shm"', fix="", attempt=None, n=3)
    assert line == 'attach failed vm=web01 reason="no \\"shm\\"" fix="" n=3'


@pytest.fixture
def journal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """stderr as systemd connects it: a stream whose device:inode is in JOURNAL_STREAM."""
    path = tmp_path / "journal"
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)  # restored afterwards
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    with open(path, "w") as stream:
        st = os.fstat(stream.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
        setup_logging(stream)
        yield path
    root.handlers[:], root.level = handlers, level


def test_every_line_of_a_traceback_carries_the_priority(journal: Path) -> None:
    try:
        raise ValueError("boom\nsecond line")
    except ValueError:
        logging.getLogger("watcher").exception(kv("vm task crashed", vm="web01"))
    lines = journal.read_text().splitlines()
    assert len(lines) > 3
    assert all(line.startswith("<3>") for line in lines), lines
    assert lines[0] == "<3>ERROR vm task crashed vm=web01"


def test_an_uncaught_exception_goes_through_the_log_with_priorities(journal: Path) -> None:
    try:
        raise OSError(24, "Too many open files")
    except OSError as exc:
        sys.excepthook(type(exc), exc, exc.__traceback__)
    lines = journal.read_text().splitlines()
    assert lines[0] == "<2>CRITICAL crashed"
    assert all(line.startswith("<2>") for line in lines), lines
    assert lines[-1] == "<2>OSError: [Errno 24] Too many open files"


def test_a_terminal_gets_plain_lines(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JOURNAL_STREAM", "1:2")  # someone else's stream, not this one
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        with open(tmp_path / "tty", "w") as stream:
            setup_logging(stream)
            logging.getLogger("watcher").warning("hello")
    finally:
        root.handlers[:], root.level = handlers, level
    (line,) = (tmp_path / "tty").read_text().splitlines()
    assert line.endswith(" WARNING hello")
    assert not line.startswith("<")


def test_the_throttle_logs_news_at_once_and_repeats_once_a_minute() -> None:
    throttle = FailureThrottle()
    assert throttle.admit("web01/data", "vm not created", 0.0) == 0  # first: log it
    assert throttle.admit("web01/data", "vm not created", 1.0) is None
    assert throttle.admit("web01/data", "vm not created", 2.0) is None
    assert throttle.admit("web01/logs", "vm not created", 2.0) == 0  # another share
    assert throttle.admit("web01/data", "vm not created", REPEAT_INTERVAL) == 2  # with a count
    assert throttle.admit("web01/data", "vm not created", REPEAT_INTERVAL + 1) is None
    assert throttle.admit("web01/data", "shared memory off", REPEAT_INTERVAL + 2) == 0  # changed
    throttle.clear("web01/data")  # it succeeded: the next failure is news
    assert throttle.admit("web01/data", "shared memory off", REPEAT_INTERVAL + 3) == 0
