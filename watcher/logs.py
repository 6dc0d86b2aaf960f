"""Log lines for journald and terminals: one event a line, `key=value` fields.

Why a `<N>` prefix on every line: journald reads a service's stderr as a
stream and takes the syslog priority from a `<N>` prefix per line
(SyslogLevelPrefix=yes is the default); a traceback's continuation lines
without it would fall back to the default priority (python-stack.md §6). We
prefix only when stderr really is the journal stream (`JOURNAL_STREAM` holds
its device:inode), so a terminal shows plain lines with a timestamp.

Why a throttle: a share that keeps failing (VM without shared memory, a
backend that never comes) would otherwise log at every retry, and 1000 VMs
doing that hit journald's per-unit rate limit and hide everything else.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import dataclass, field
from types import TracebackType
from typing import TextIO

_PRIORITY = {
    logging.CRITICAL: 2,
    logging.ERROR: 3,
    logging.WARNING: 4,
    logging.INFO: 6,
    logging.DEBUG: 7,
}


def kv(event: str, **fields: object) -> str:
    """`event key=value ...`; values with spaces, quotes or '=' are JSON-quoted."""
    parts = [event]
    for key, value in fields.items():
        if value is None:
            continue
        text = str(value)
        if not text or any(ch in text for ch in ' "=\n\t'):
            text = json.dumps(text)
        parts.append(f"{key}={text}")
    return " ".join(parts)


def journal_stream_matches(stream: TextIO) -> bool:
    """True when `stream` is the journald stream systemd connected us to."""
    expected = os.environ.get("JOURNAL_STREAM", "")
    if not expected:
        return False
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError):
        return False
    return expected == f"{st.st_dev}:{st.st_ino}"


class JournalFormatter(logging.Formatter):
    """Prefix every line of a record, tracebacks included, with its syslog priority."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        prefix = f"<{_PRIORITY.get(record.levelno, 6)}>"
        return "\n".join(prefix + line for line in text.split("\n"))


def setup_logging(stream: TextIO | None = None, level: int = logging.INFO) -> None:
    """Route all logging to stderr in the format that suits where stderr goes."""
    stream = stream or sys.stderr
    handler = logging.StreamHandler(stream)
    formatter: logging.Formatter
    if journal_stream_matches(stream):
        formatter = JournalFormatter("%(levelname)s %(message)s")
    else:
        formatter = logging.Formatter("%(asctime)s %(levelname)s %(message)s")
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # A crash's traceback through the same handler: prefixed under journald, so it is
    # filed as an error like any other (Python's default hook writes plain lines).
    sys.excepthook = _log_uncaught


def _log_uncaught(
    kind: type[BaseException], value: BaseException, traceback: TracebackType | None
) -> None:
    logging.getLogger("watcher").critical(kv("crashed"), exc_info=(kind, value, traceback))


REPEAT_INTERVAL = 60.0
"""A failure that does not change is logged again at most once a minute."""


@dataclass
class _Seen:
    signature: str
    logged_at: float
    suppressed: int = 0


@dataclass
class FailureThrottle:
    """Decides whether a repeated failure deserves a log line.

    A key (VM, share) logs its first failure, then a changed failure at once,
    then the same failure at most every `interval` seconds with a count of
    what was held back. `clear(key)` when the key succeeds, so the next
    failure is news again.
    """

    interval: float = REPEAT_INTERVAL
    _seen: dict[str, _Seen] = field(default_factory=dict)

    def admit(self, key: str, signature: str, now: float) -> int | None:
        """None: stay quiet. Otherwise log, mentioning the returned count of held-back repeats."""
        seen = self._seen.get(key)
        if seen is None or seen.signature != signature:
            self._seen[key] = _Seen(signature, now)
            return 0
        if now - seen.logged_at >= self.interval:
            held_back = seen.suppressed
            self._seen[key] = _Seen(signature, now)
            return held_back
        seen.suppressed += 1
        return None

    def admit_event(self, key: str, event: str, reason: object, now: float) -> int | None:
        """admit() for a log event and its reason: one signature format for every caller,
        so two places that log the same failure of one key share its throttle."""
        return self.admit(key, f"{event}:{reason}", now)

    def clear(self, key: str) -> None:
        self._seen.pop(key, None)
