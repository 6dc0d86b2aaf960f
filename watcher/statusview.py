"""`virtiofs-reattach status [--json]`: the state file, shown to a person or a script.

The view trusts nothing it cannot check. The state file outlives the daemon
on purpose (RuntimeDirectoryPreserve=yes), so before showing anything the
view asks the kernel whether the pid that wrote it still exists; a dead
writer means every "attached" in the file may be history, and the only
honest answer is "not running" with exit code 1. A live pid is not enough
either: a stopped (SIGSTOP) or stuck daemon keeps its pid and its last
document, so a document older than a few of the daemon's heartbeats is
reported as stale, exit 1, instead of being shown as current. The same check
catches a pid the kernel has since given to another process.

Exit codes, part of the interface like `once`'s: 0 when the config is valid
and every share of every VM whose API socket is live is attached; 1
otherwise, including daemon not running or hung, unreadable state, and a VM
whose socket is still being checked. A VM that is not running does not count
against the daemon: there is nothing to attach to. Messages about the file
or the daemon go to stderr, so stdout carries only the requested format and
`--json` output always parses.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable

from .statusfile import (
    HEARTBEAT,
    BackendDoc,
    Document,
    ShareDoc,
    StatusFileError,
    StatusFileMissing,
    VmDoc,
    read,
)

STATE_WIDTH = len("waiting-backend")

STALE_AFTER = 3 * HEARTBEAT
"""Three missed heartbeats, not one: a write waits for the event loop and a
worker thread, and a loaded host delays both; a false "hung" would teach
people to ignore the message."""


def pid_alive(pid: int) -> bool:
    """Signal 0 tests existence; EPERM still means it exists (a root daemon, a user CLI)."""
    if pid <= 0:
        return False  # kill(0) and kill(-1) address process groups, not one process
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def not_running(document: Document, is_alive: Callable[[int], bool] = pid_alive) -> str | None:
    """The verdict when the writer of `document` is gone, else None."""
    pid = document["pid"]
    if is_alive(pid):
        return None
    written = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(document["updated"]))
    return f"virtiofs-reattach is not running (state file from {written} left by pid {pid})"


def stale(document: Document, *, now: float) -> str | None:
    """The verdict when the (live) writer of `document` has stopped rewriting it, else None.

    Wall-clock times, because `updated` must mean something to another
    process: a clock stepped forward can make a working daemon look stale
    until its next heartbeat, which is the cheaper mistake.
    """
    age = now - document["updated"]
    if age <= STALE_AFTER:
        return None
    return (
        f"state is stale: last written {int(age)}s ago by pid {document['pid']};"
        " the daemon may be hung (check journalctl -u virtiofs-reattach)"
    )


def exit_code(document: Document) -> int:
    """1 unless the config is valid and every running VM has all its shares attached.

    A "checking" socket exists but its CH has not answered yet, and an
    "unreachable" one stopped answering: either VM is probably running and
    nothing about its shares is known, so it is not healthy.
    """
    if not document["config"]["valid"]:
        return 1
    for vm in document["vms"]:
        if vm["socket"] in ("checking", "unreachable"):
            return 1
        if vm["socket"] == "live" and any(s["state"] != "attached" for s in vm["shares"]):
            return 1
    return 0


def as_json(document: Document) -> str:
    return json.dumps(document, indent=2) + "\n"


def human(document: Document, *, now: float) -> str:
    """One header line, then per VM a socket line and one line per share, followed,
    for a managed share, by one line about its virtiofsd.

    Every line starts with the VM name so `status | grep web01` shows all
    of a VM; times are relative to `now`, because "3m" is what a person
    checking on a stuck share wants to know.
    """
    config = document["config"]
    files = counted(len(config["files"]), "file")
    verdict = (
        "valid" if config["valid"] else f"INVALID ({counted(len(config['problems']), 'problem')})"
    )
    lines = [
        f"virtiofs-reattach pid {document['pid']}, updated {_span(now - document['updated'])} ago;"
        f" config {config['path']} {verdict} ({files})"
    ]
    lines.extend(f"  {problem}" for problem in config["problems"])
    vms = document["vms"]
    if not vms:
        lines.append("no VMs configured")
    name_width = max((len(vm["name"]) for vm in vms), default=0)
    tag_width = max((len(s["tag"]) for vm in vms for s in vm["shares"]), default=0)
    for vm in vms:
        name = vm["name"].ljust(name_width)
        lines.append(f"{name}  {_vm_summary(vm)}")
        for share in vm["shares"]:
            since = "-" if share["since"] is None else _span(now - share["since"])
            line = (
                f"{name}  {share['tag'].ljust(tag_width)}  {share['state'].ljust(STATE_WIDTH)}"
                f"  {since:>4}  {_share_detail(share, now)}"
            )
            lines.append(line.rstrip())
            backend = share.get("backend")
            if backend is not None:
                lines.append(f"{name}  {'':{tag_width}}  virtiofsd: {_backend_summary(backend)}")
        if vm["unmanaged"]:
            lines.append(
                f"{name}  not in the config, left attached (prune is off): "
                + ", ".join(vm["unmanaged"])
            )
    return "\n".join(lines) + "\n"


def _vm_summary(vm: VmDoc) -> str:
    parts = [f"socket {vm['socket']}"]
    if vm["ch_version"] is not None:
        parts.append(f"CH {vm['ch_version']}")
    if vm["ch_pid"] is not None:
        parts.append(f"pid {vm['ch_pid']}")
    if vm["vm_state"] is not None:
        parts.append(f"VM {vm['vm_state']}")
    elif vm["socket"] == "live":
        # CH listens before it creates its VM, and one started without a VM
        # config waits for vm.create forever; vm.info says "VM is not
        # created" meanwhile (cloud-hypervisor-api.md §6).
        parts.append("VM not created")
    summary = ", ".join(parts)
    return f"{summary}: {vm['detail']}" if vm["detail"] else summary


def _backend_summary(backend: BackendDoc) -> str:
    """E.g. "listening pid 5120, 2 restarts, last error: ...": a managed share's virtiofsd,
    on the line under its share, where the tag column is left blank."""
    text = backend["state"]
    if backend["pid"] is not None:
        text += f" pid {backend['pid']}"
    if backend["restarts"]:
        text += f", {counted(backend['restarts'], 'restart')}"
    if backend["last_error"]:
        text += f", last error: {backend['last_error']}"
    if backend["fix"]:
        text += f"; fix: {backend['fix']}"
    return text


def _share_detail(share: ShareDoc, now: float) -> str:
    text = share["detail"]
    if share["fix"]:
        text = f"{text}; fix: {share['fix']}" if text else f"fix: {share['fix']}"
    retry = []
    if share["attempt"]:
        retry.append(f"attempt {share['attempt']}")
    if share["next_try_at"] is not None:
        retry.append(f"next try in {_span(share['next_try_at'] - now)}")
    if retry:
        text = f"{text} ({', '.join(retry)})" if text else ", ".join(retry)
    return text


def counted(n: int, noun: str) -> str:
    """E.g. "1 file", "2 files" (for nouns whose plural takes an s)."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _span(seconds: float) -> str:
    """Compact duration: 42s, 3m, 5h, 2d, truncated. Negative (a clock step) shows as 0s."""
    seconds = max(0, int(seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def show(
    path: str, *, json_output: bool = False, is_alive: Callable[[int], bool] = pid_alive
) -> int:
    """Everything `status` does: read, check the writer is alive and working, print, exit code."""
    try:
        document = read(path)
    except StatusFileMissing:
        print(
            "virtiofs-reattach is not running, or cannot write its state"
            f" (no state file at {path})",
            file=sys.stderr,
        )
        return 1
    except StatusFileError as err:
        print(err, file=sys.stderr)
        return 1
    now = time.time()
    verdict = not_running(document, is_alive) or stale(document, now=now)
    if verdict is not None:
        print(verdict, file=sys.stderr)
        return 1
    sys.stdout.write(as_json(document) if json_output else human(document, now=now))
    return exit_code(document)
