"""The `virtiofs-reattach` command: run, check, once, status, demo.

Exit codes are part of the interface (monitoring and config management use
them): `check` 0 valid / 1 invalid / 2 usage; `once` and `status` 0 when
every share of every running VM is attached, else 1; `run` 0 on
SIGTERM/SIGINT, 1 when it cannot start (an invalid config, or another daemon
already running on the same `[backend] runtime_dir`: daemonlock.py).

Only `run` takes the daemon lock. `once` is a manual one-shot that starts no
virtiofsd, and a `once` racing the daemon is harmless: CH serves one request
at a time and refuses a second add-fs of an id before connecting its backend,
and the loser reads that "duplicate id" as "already attached".
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
from collections.abc import Sequence

from . import statusfile, statusview
from .backends_virtiofsd import BackendError, find_virtiofsd, probe
from .config import DEFAULT_CONFIG_PATH, Config, ConfigError, load_config
from .daemonlock import DaemonLock, LockHeld, LockUnavailable
from .logs import kv, setup_logging
from .reconciler import VmSettings, VmWorker, is_socket
from .service import Service
from .state import ShareState, SocketState, VmStatus

log = logging.getLogger("watcher")

CONFIG_ENV = "VIRTIOFS_REATTACH_CONFIG"
STATE_ENV = "VIRTIOFS_REATTACH_STATE"


def main(argv: Sequence[str] | None = None) -> int:
    # SIGHUP means "reload"; until the daemon's handler is installed it must not
    # mean "die" (its default), e.g. a `systemctl reload` racing a start.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "demo":
        from .demo import run_demo

        return run_demo()
    if args.command == "status":
        return statusview.show(_state_path(args), json_output=args.json)
    path = args.config or os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG_PATH
    if args.command == "check":
        return _check(path)
    setup_logging(level=logging.DEBUG if args.verbose else logging.INFO)
    config = _load_or_report(path)
    if config is None:
        return 1
    if args.command == "once":
        return asyncio.run(_once(config))
    lock = _lock_or_report(config.backend.runtime_dir)
    if lock is None:
        return 1
    with lock:
        return asyncio.run(Service(config, path, _state_path(args)).run())


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="virtiofs-reattach",
        description="Keep virtiofs shares attached to Cloud Hypervisor VMs.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    helps = {
        "run": "run the daemon in the foreground",
        "check": "validate the config and exit (0 valid, 1 invalid)",
        "once": "reconcile every running VM once, then exit (0 when all shares are attached)",
    }
    for name, text in helps.items():
        cmd = sub.add_parser(name, help=text, description=text)
        cmd.add_argument(
            "-c",
            "--config",
            metavar="PATH",
            help=f"config file (default: ${CONFIG_ENV} or {DEFAULT_CONFIG_PATH})",
        )
        if name != "check":
            cmd.add_argument("-v", "--verbose", action="store_true", help="log debug lines too")
        if name == "run":
            _state_option(cmd)
    status = sub.add_parser(
        "status",
        help="show what the running daemon knows (0 when all shares of running VMs are attached)",
        description="Read the daemon's state file and show every VM and share.",
    )
    status.add_argument("--json", action="store_true", help="print the state document as JSON")
    _state_option(status)
    sub.add_parser(
        "demo",
        help="show the daemon at work on two simulated VMs (no CH host needed)",
        description="Start two Cloud Hypervisor test doubles and backends in a temp folder, "
        "run the real daemon against them, restart one VM, and report what happened.",
    )
    return parser


def _state_option(cmd: argparse.ArgumentParser) -> None:
    cmd.add_argument(
        "--state-file",
        metavar="PATH",
        help=f"the daemon's state file (default: ${STATE_ENV} or {statusfile.DEFAULT_PATH})",
    )


def _state_path(args: argparse.Namespace) -> str:
    return str(args.state_file or os.environ.get(STATE_ENV) or statusfile.DEFAULT_PATH)


def _check(path: str) -> int:
    try:
        config = load_config(path)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem)
        return 1
    shares = sum(len(shares) for shares in config.vms.values())
    counts = ", ".join(
        (
            statusview.counted(len(config.vms), "VM"),
            statusview.counted(shares, "share"),
            statusview.counted(len(config.files), "file"),
        )
    )
    print(f"{path}: valid ({counts})")
    for warning in _backend_warnings(config):
        print(f"warning: {warning}")
    return 0


def _backend_warnings(config: Config) -> list[str]:
    """What would stop a managed share's virtiofsd on this machine. Warnings, not
    problems: the config may be checked on another machine than the one it runs on."""
    managed = [share for shares in config.vms.values() for share in shares if share.managed]
    if not managed:
        return []
    try:
        virtiofsd = asyncio.run(probe(find_virtiofsd(config.backend.virtiofsd)))
    except BackendError as exc:
        return [f"managed shares cannot run here: {exc}"]
    warnings = []
    for share in managed:
        where = f"vm {share.vm} share {share.tag}"
        try:
            virtiofsd.argv(share, config.backend.extra_args)
        except BackendError as exc:
            warnings.append(f"{where}: {exc}")
        if share.shared_dir is not None and not os.path.isdir(share.shared_dir):
            warnings.append(
                f"{where}: shared_dir {share.shared_dir} is not a folder here"
                " (create it, or fix shared_dir)"
            )
    return warnings


def _load_or_report(path: str) -> Config | None:
    try:
        return load_config(path)
    except ConfigError as exc:
        for problem in exc.problems:
            log.error(kv("config invalid", problem=problem))
        return None


def _lock_or_report(runtime_dir: str) -> DaemonLock | None:
    """The daemon lock, taken before anything touches a VM or a backend; None (logged) if not."""
    try:
        return DaemonLock.acquire(runtime_dir)
    except LockHeld as exc:
        log.error(
            kv(
                "another daemon is running",
                pid=exc.pid,
                lock=exc.path,
                fix="stop it (systemctl stop virtiofs-reattach), "
                "or give this one its own [backend] runtime_dir and --state-file",
            )
        )
    except LockUnavailable as exc:
        log.error(kv("cannot take the daemon lock", lock=exc.path, error=exc.reason, fix=exc.fix))
    return None


async def _once(config: Config) -> int:
    """One pass per VM whose API socket exists, all VMs at once, no backoff."""
    settings = VmSettings(
        device_id_prefix=config.watch.device_id_prefix,
        prune=config.watch.prune,
        retry=config.retry,
    )
    workers = []
    for name, shares in config.vms.items():
        path = config.watch.api_socket.path_for(name)
        if is_socket(path):
            workers.append(VmWorker(name, path, shares, settings))
        else:
            print(f"{name}: not running (no API socket at {path})")
    await asyncio.gather(*(worker.reconcile(retry=False) for worker in workers))
    ok = True
    for worker in workers:
        ok &= _print_vm(worker.status)
    return 0 if ok else 1


def _print_vm(status: VmStatus) -> bool:
    if status.socket is SocketState.STALE:
        print(f"{status.name}: not running (stale API socket {status.api_socket})")
        return True
    header = f"{status.name}: CH {status.ch_version or '?'} pid {status.ch_pid or '?'}"
    if status.vm_state is not None:
        print(f"{header}, VM {status.vm_state}")
    else:
        print(f"{header}, {status.detail or status.socket.value}")
    ok = True
    for share in status.shares.values():
        line = f"  {share.tag} ({share.device_id}): {share.state.value}"
        if share.detail:
            line += f": {share.detail}"
        if share.fix:
            line += f" (fix: {share.fix})"
        print(line)
        ok &= share.state is ShareState.ATTACHED
    if not status.shares and status.detail:
        print(f"  {status.detail}")
    for device_id in status.unmanaged:
        print(f"  {device_id}: no longer managed (not in the config; prune is off)")
    return ok and status.socket is SocketState.LIVE
