"""The daemon's state as a JSON file, for `virtiofs-reattach status` and monitoring.

Why a file and not a socket the CLI asks: the daemon's unit allows no
listening sockets worth exposing (RestrictAddressFamilies=AF_UNIX,
PrivateNetwork=yes), a file needs no protocol, and it still says something
when the daemon is dead: who wrote it last and when.

Why atomic: readers (the CLI, a monitoring agent) may read at any moment. The
document is written to a temporary file in the same folder, fsynced, then
`os.replace`d over the old one, so a reader sees the old document or the new
one, never half of one. Same folder because a rename across file systems is
not atomic. The default folder is systemd's `RuntimeDirectory=` (tmpfs, so
the fsync costs nothing and the file disappears at reboot, as a pid should).

Why a heartbeat: a live pid does not mean a working daemon. A daemon that
is stopped (SIGSTOP) or stuck keeps its pid and its last document, and a
quiet daemon writes nothing because nothing changed; from the file alone the
two look the same. So the daemon rewrites the document at least every
`HEARTBEAT` seconds even without a change, and a reader that finds `updated`
much older than that knows the writer has stopped working (or can no
longer write; its log says which).

A failed write is logged once (until a write succeeds again) and never
raised: the daemon's job is attaching shares, and a full or read-only /run
must not stop that.

Document, version 1 (the README carries the same text)::

    {
      "version": 1,                  # bumped when a key is removed or changes meaning
      "pid": 812,                    # the daemon that wrote it
      "updated": 1767225600.25,      # unix time of this write; at most HEARTBEAT (30 s) old
                                     # while the daemon works
      "config": {
        "path": "/etc/virtiofs-reattach/mounts.toml",
        "files": ["/etc/virtiofs-reattach/mounts.toml", ".../mounts.d/web.toml"],
        "valid": true,               # false: the last reload failed, old config still in use
        "problems": []               # one line per problem when not valid
      },
      "vms": [                       # every configured VM, in config order
        {
          "name": "web01",
          "api_socket": "/run/cloud-hypervisor/web01.sock",
          "socket": "live",          # absent | checking | stale | live | not-ch | unreachable
                                     # (checking: the file exists, CH has not answered yet)
          "ch_version": "53.0.0",    # vmm.ping's version, null until CH answered
          "ch_pid": 4321,            # null until CH answered
          "vm_state": "Running",     # CH's vm.info state, null until known
          "detail": "",              # why the socket is in that state
          "shares": [
            {
              "tag": "data",
              "device_id": "cocoon-fs-data",
              "state": "attached",   # pending | attached | waiting-backend |
                                     # waiting-eject | retrying | failed
              "since": 1767225590.0, # unix time it entered this state; null if never looked at
              "detail": "",          # CH's reason, or what is awaited
              "fix": "",             # for failed: what a human must change
              "attempt": 0,          # attempts so far in this state
              "next_try_at": null,   # unix time of the next attempt when retrying
              "backend": {           # managed shares (shared_dir) only; null for the others
                "state": "serving",  # starting | listening | serving | adopted |
                                     # backoff | failed | stopped (on-demand, VM not running)
                "pid": 5120,         # the current virtiofsd, null when none runs
                "restarts": 2,       # virtiofsd started again since this daemon took over:
                                     # once per guest reboot, and at every failed attempt
                "last_error": null,  # why the last failed run failed (kept after recovery)
                "fix": null          # what a human must change, while it keeps failing
              }
            }
          ],
          "unmanaged": []            # device ids with our prefix the config no longer lists
        }
      ]
    }

Readers must ignore keys they do not know: adding a key does not bump the
version. A share's ``backend`` came later within version 1, so a reader must
also accept it missing.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Iterable, Sequence
from typing import TypedDict, cast

from .backends_share import BackendStatus
from .config import DEFAULT_STATE_PATH
from .logs import kv
from .state import ShareStatus, VmStatus

log = logging.getLogger("watcher.statusfile")

VERSION = 1
DEFAULT_PATH = DEFAULT_STATE_PATH

HEARTBEAT = 30.0
"""Longest time, in seconds, between two writes of a working daemon, changes or not.

A rewrite on tmpfs costs a memory copy, so the period only has to be short
next to how long a person or a monitoring check tolerates not knowing that
the daemon hangs; readers allow a few periods before calling it stale."""

FOLDER_MODE = 0o755
FILE_MODE = 0o644
"""World-readable on purpose: `status` needs no root, and the document holds no secrets.
Set explicitly because the unit's UMask=0077 would otherwise make both private."""


class ConfigDoc(TypedDict):
    path: str
    files: list[str]
    valid: bool
    problems: list[str]


class BackendDoc(TypedDict):
    state: str
    pid: int | None
    restarts: int
    last_error: str | None
    fix: str | None


class _ShareKeys(TypedDict):
    tag: str
    device_id: str
    state: str
    since: float | None
    detail: str
    fix: str
    attempt: int
    next_try_at: float | None


class ShareDoc(_ShareKeys, total=False):
    backend: BackendDoc | None
    """Optional: documents written before it was added lack it. (Not NotRequired[]: under
    ``from __future__ import annotations`` Python 3.11 counts such a key as required.)"""


class VmDoc(TypedDict):
    name: str
    api_socket: str
    socket: str
    ch_version: str | None
    ch_pid: int | None
    vm_state: str | None
    detail: str
    shares: list[ShareDoc]
    unmanaged: list[str]


class Document(TypedDict):
    version: int
    pid: int
    updated: float
    config: ConfigDoc
    vms: list[VmDoc]


class StatusFileError(Exception):
    """The state file cannot be used: unreadable, corrupt, or from another version."""


class StatusFileMissing(StatusFileError):
    """No state file: the daemon never ran since boot, or /run was cleaned."""


def render(
    statuses: Iterable[VmStatus],
    *,
    config_path: str,
    config_files: Sequence[str],
    config_valid: bool,
    problems: Sequence[str],
) -> Document:
    """The version-1 document for these VM records, stamped with our pid and the time."""
    return {
        "version": VERSION,
        "pid": os.getpid(),
        "updated": time.time(),
        "config": {
            "path": config_path,
            "files": list(config_files),
            "valid": config_valid,
            "problems": list(problems),
        },
        "vms": [_vm(status) for status in statuses],
    }


def _vm(status: VmStatus) -> VmDoc:
    return {
        "name": status.name,
        "api_socket": status.api_socket,
        "socket": status.socket.value,
        "ch_version": status.ch_version,
        "ch_pid": status.ch_pid,
        "vm_state": status.vm_state,
        "detail": status.detail,
        "shares": [_share(share) for share in status.shares.values()],
        "unmanaged": list(status.unmanaged),
    }


def _share(share: ShareStatus) -> ShareDoc:
    return {
        "tag": share.tag,
        "device_id": share.device_id,
        "state": share.state.value,
        # ShareStatus uses 0.0 for "not looked at yet"; 1970 would mislead a reader.
        "since": share.since or None,
        "detail": share.detail,
        "fix": share.fix,
        "attempt": share.attempt,
        "next_try_at": share.next_try_at,
        "backend": None if share.backend is None else _backend(share.backend),
    }


def _backend(status: BackendStatus) -> BackendDoc:
    return {
        "state": status.state,
        "pid": status.pid,
        "restarts": status.restarts,
        "last_error": status.last_error,
        "fix": status.fix,
    }


_failing: set[str] = set()
"""Paths whose last write failed, so a persistent failure is logged once, not per update."""


def write(path: str, document: Document) -> bool:
    """Replace the file at `path` with `document` atomically; False (logged) on failure.

    Blocking file I/O, but on tmpfs (the default) it is a memory copy; call
    it via `asyncio.to_thread` if `path` is on a disk.
    """
    folder = os.path.dirname(path) or "."
    try:
        _ensure_folder(folder)
        fd, temp = tempfile.mkstemp(prefix=".state-", suffix=".tmp", dir=folder)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as out:
                json.dump(document, out, indent=2)
                out.write("\n")
                out.flush()
                os.fsync(out.fileno())
            os.chmod(temp, FILE_MODE)
            os.replace(temp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temp)
            raise
    except OSError as err:
        if path not in _failing:
            _failing.add(path)
            log.error(
                kv(
                    "cannot write state file",
                    path=path,
                    error=err.strerror or str(err),
                    effect="`virtiofs-reattach status` shows old data until this is fixed",
                )
            )
        return False
    if path in _failing:
        _failing.discard(path)
        log.info(kv("state file written again", path=path))
    return True


def _ensure_folder(folder: str) -> None:
    if os.path.isdir(folder):
        return
    os.makedirs(folder, mode=FOLDER_MODE, exist_ok=True)
    os.chmod(folder, FOLDER_MODE)  # makedirs' mode is filtered by the umask


def read(path: str) -> Document:
    """The document at `path`; StatusFileError (or its StatusFileMissing) says why not.

    Checks the version and that every key of version 1 is present with the
    right kind of container; values are trusted, because only the daemon
    writes this file and the atomic replace rules out torn writes.
    """
    try:
        with open(path, "rb") as source:
            raw = source.read()
    except FileNotFoundError:
        raise StatusFileMissing(f"no state file at {path}") from None
    except OSError as err:
        raise StatusFileError(f"cannot read state file {path}: {err.strerror or err}") from None
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise StatusFileError(f"state file {path} is corrupt (not JSON: {err})") from None
    if not isinstance(data, dict) or "version" not in data:
        raise StatusFileError(f"state file {path} is corrupt (no version)")
    if data["version"] != VERSION:
        raise StatusFileError(
            f"state file {path} has version {data['version']!r}; "
            f"this virtiofs-reattach reads version {VERSION} "
            "(the daemon and the command come from different installs?)"
        )
    _check_keys(path, "", data, Document.__required_keys__)
    _check_keys(path, "config", data["config"], ConfigDoc.__required_keys__)
    if not isinstance(data["vms"], list):
        raise StatusFileError(f"state file {path} is corrupt (vms is not a list)")
    for i, vm in enumerate(data["vms"]):
        _check_keys(path, f"vms[{i}]", vm, VmDoc.__required_keys__)
        for list_key in ("shares", "unmanaged"):
            if not isinstance(vm[list_key], list):
                raise StatusFileError(
                    f"state file {path} is corrupt (vms[{i}].{list_key} is not a list)"
                )
        for j, share in enumerate(vm["shares"]):
            _check_keys(path, f"vms[{i}].shares[{j}]", share, ShareDoc.__required_keys__)
    return cast(Document, data)


def _check_keys(path: str, where: str, value: object, required: frozenset[str]) -> None:
    if not isinstance(value, dict):
        raise StatusFileError(f"state file {path} is corrupt ({where or 'top'} is not an object)")
    missing = sorted(required - value.keys())
    if missing:
        where_text = f" in {where}" if where else ""
        raise StatusFileError(
            f"state file {path} is corrupt (missing {', '.join(missing)}{where_text})"
        )
