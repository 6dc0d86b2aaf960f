"""A stand-in virtiofsd for machines without one: same CLI surface, same lifecycle, no file serving.

It reproduces what a host daemon can observe of virtiofsd (virtiofsd.md §1, §2), because that is
what the daemon's supervision is built on:
- it serves exactly ONE vhost-user connection and exits with rc 0 when the frontend disconnects;
  a VM reboot in CH therefore always needs a new backend process;
- `--socket-path` unlinks a stale file, binds and listens, and leaves the file behind on exit
  (like the legacy C virtiofsd of Debian 12), so a later connect gets ECONNREFUSED;
- `--fd=N` uses the caller's listener and never unlinks anything, so several backends can serve
  one socket one after the other (the libvirt/Kata/Incus/Proxmox pattern, virtiofsd.md §3);
- SIGTERM gives rc 1; a missing shared dir gives `ERROR virtiofsd] DIR does not exist`, rc 1.

It answers the handshake with the feature bits the legacy C virtiofsd reports (0x175000000) and
acknowledges anything else without acting on it. It is synchronous and stdlib-only on purpose:
it runs as its own process, exactly where a real virtiofsd would.

Usage: python -m watcher.testing.fake_virtiofsd (--socket-path=PATH | --fd=N)
           [--shared-dir=DIR] [-o source=DIR] [--print-capabilities]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import sys
from types import FrameType

from watcher.testing.vhost_user import (
    FLAG_NEED_REPLY,
    FLAG_REPLY,
    HEADER,
    U64,
    VERSION,
    VERSION_MASK,
    Request,
)

FEATURES = 0x175000000
PROTOCOL_FEATURES = 0
CAPABILITIES = {"type": "fs", "features": ["migrate-precopy", "separate-options"]}


def _log(level: str, message: str) -> None:
    # virtiofsd's env_logger format, which operators and tests grep for.
    print(f"[{level:<5} virtiofsd] {message}", file=sys.stderr, flush=True)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="fake_virtiofsd", description="A stand-in virtiofsd that serves one frontend."
    )
    parser.add_argument("--socket-path", help="bind and listen here (a stale file is replaced)")
    parser.add_argument("--fd", type=int, help="an already listening socket, inherited")
    parser.add_argument("--shared-dir", help="directory to share; must exist")
    parser.add_argument(
        "-o",
        dest="options",
        action="append",
        default=[],
        metavar="OPTION",
        help="legacy C virtiofsd options; source=DIR is the shared dir, others are ignored",
    )
    # Taken and ignored, as the daemon passes them to a managed share's virtiofsd:
    # nothing is served from the folder, so caching and read-only change nothing here.
    parser.add_argument("--cache", choices=("auto", "always", "never", "metadata"))
    parser.add_argument("--readonly", action="store_true")
    parser.add_argument("--print-capabilities", action="store_true")
    args = parser.parse_args(argv)
    if not args.print_capabilities and (args.socket_path is None) == (args.fd is None):
        parser.error("exactly one of --socket-path and --fd is required")
    for option in args.options:
        key, _, value = option.partition("=")
        if key == "source":
            args.shared_dir = value
    return args


def _listen(args: argparse.Namespace) -> socket.socket:
    if args.fd is not None:
        return socket.socket(fileno=args.fd)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(args.socket_path)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(args.socket_path)
    listener.listen()
    return listener


def _recv_exactly(conn: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            raise EOFError
        data += chunk
    return data


def _reply_u64(conn: socket.socket, request: int, value: int) -> None:
    conn.sendall(HEADER.pack(request, VERSION | FLAG_REPLY, U64.size) + U64.pack(value))


def _serve(conn: socket.socket) -> None:
    """Answer requests until the frontend hangs up (EOFError or ConnectionResetError)."""
    while True:
        request, flags, size = HEADER.unpack(_recv_exactly(conn, HEADER.size))
        if flags & VERSION_MASK != VERSION:
            raise ValueError(f"InvalidMessage: flags {flags:#x}")
        # Payloads of requests we do not act on are skipped; any fds they carried (SCM_RIGHTS)
        # are dropped by the kernel because we pass no control buffer.
        _recv_exactly(conn, size)
        if request == Request.GET_FEATURES:
            _reply_u64(conn, request, FEATURES)
        elif request == Request.GET_PROTOCOL_FEATURES:
            _reply_u64(conn, request, PROTOCOL_FEATURES)
        elif flags & FLAG_NEED_REPLY:
            _reply_u64(conn, request, 0)  # REPLY_ACK: 0 means success


def _exit_on_sigterm(signum: int, frame: FrameType | None) -> None:
    # Python's default would die by the signal (rc -15); virtiofsd exits with status 1.
    raise SystemExit(1)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    if args.print_capabilities:
        print(json.dumps(CAPABILITIES))
        return 0
    if args.shared_dir is not None and not os.path.isdir(args.shared_dir):
        _log("ERROR", f"{args.shared_dir} does not exist")
        return 1
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    listener = _listen(args)
    _log("INFO", "Waiting for vhost-user socket connection...")
    conn, _ = listener.accept()
    # Like virtiofsd: one frontend only. Closing our copy of the listener refuses later connects
    # in --socket-path mode; in --fd mode the caller's copy keeps listening for the next backend.
    listener.close()
    _log("INFO", "Client connected, servicing requests")
    with conn:
        try:
            _serve(conn)
        except (EOFError, ConnectionResetError):
            pass
        except ValueError as exc:
            _log("ERROR", f"Waiting for daemon failed: HandleRequest({exc})")
            return 1
    _log("INFO", "Client disconnected, shutting down")
    return 0


if __name__ == "__main__":
    sys.exit(main())
