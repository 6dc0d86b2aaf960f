"""The CH double's control socket: its test observability, for a double running as a process.

End-to-end tests run the daemon and the double as separate processes, so they cannot read the
double's attributes. The control socket (AF_UNIX stream) carries newline-delimited JSON: one
request object per line, one reply line each, `{"ok": true, "result": ...}` or
`{"ok": false, "error": "..."}`. Commands:

    {"cmd": "requests"}                 every API request, as RecordedRequest.to_json()
    {"cmd": "info"}                     the vm.info body, or null when no VM is created
    {"cmd": "state"}                    "none" | "Created" | "Running" | "Paused"
    {"cmd": "backends"}                 ids of the devices holding a vhost-user connection
    {"cmd": "attempts", "socket": P}    errno (or null for success) of each connect to P
    {"cmd": "needs-reset", "id": ID}    whether the device's backend is gone for good (v52+)
    {"cmd": "events"}                   event-monitor records (device-removed, booted, ...)
    {"cmd": "eject", "id": ID}          the guest ejects a device whose removal is pending
    {"cmd": "guest-reboot"}             the guest resets; false if CH then exits with 1
    {"cmd": "hang", "on": true}         the VMM thread hangs (or recovers, with false)

Readiness: the double's process prints `ready pid=<pid>` on stdout once its API socket listens
and this socket accepts; `read_ready_line` reads it. `DoubleControl.wait_ready` polls this socket
instead, for callers that do not own the process's stdout. Neither sends an HTTP request, so
neither shows up in the double's `requests`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from watcher.testing.chdouble import CloudHypervisorDouble

READY_PREFIX = "ready pid="


class DoubleControlError(Exception):
    """The double refused a control command."""


async def serve_control(path: str, double: CloudHypervisorDouble) -> asyncio.Server:
    """Listen on `path` and answer control commands about `double`."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():
                writer.write(json.dumps(await _reply(double, line)).encode() + b"\n")
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)  # left by an earlier double that was killed
    return await asyncio.start_unix_server(handle, path=path)


async def _reply(double: CloudHypervisorDouble, line: bytes) -> dict[str, Any]:
    try:
        command = json.loads(line)
        handler = _COMMANDS[command["cmd"]]
        return {"ok": True, "result": await handler(double, command)}
    except (ValueError, KeyError, TypeError) as error:
        return {"ok": False, "error": f"{type(error).__name__}: {error}"}


async def _eject(double: CloudHypervisorDouble, command: dict[str, Any]) -> None:
    await double.eject(command["id"])


async def _hang(double: CloudHypervisorDouble, command: dict[str, Any]) -> None:
    double.set_hung(bool(command.get("on", True)))


def _value(
    read: Callable[[CloudHypervisorDouble, dict[str, Any]], Any],
) -> Callable[[CloudHypervisorDouble, dict[str, Any]], Awaitable[Any]]:
    async def handler(double: CloudHypervisorDouble, command: dict[str, Any]) -> Any:
        return read(double, command)

    return handler


_COMMANDS: dict[str, Callable[[CloudHypervisorDouble, dict[str, Any]], Awaitable[Any]]] = {
    "requests": _value(lambda double, _: [request.to_json() for request in double.requests]),
    "info": _value(lambda double, _: double.info()),
    "state": _value(lambda double, _: double.state),
    "backends": _value(lambda double, _: double.connected_backends()),
    "attempts": _value(lambda double, command: double.connect_attempts(command["socket"])),
    "needs-reset": _value(lambda double, command: double.needs_reset(command["id"])),
    "events": _value(lambda double, _: double.events),
    "eject": _eject,
    "guest-reboot": lambda double, _: double.guest_reboot(),
    "hang": _hang,
}


class DoubleControl:
    """Client of a double's control socket; one short connection per call."""

    def __init__(self, path: str) -> None:
        self.path = path

    async def call(self, command: dict[str, Any]) -> Any:
        """Send one command; its result, or DoubleControlError with the double's reason."""
        reader, writer = await asyncio.open_unix_connection(self.path)
        try:
            writer.write(json.dumps(command).encode() + b"\n")
            await writer.drain()
            line = await reader.readline()
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
        if not line:
            raise DoubleControlError(f"the double closed the control socket on {command!r}")
        reply = json.loads(line)
        if not reply["ok"]:
            raise DoubleControlError(reply["error"])
        return reply["result"]

    async def wait_ready(self, timeout: float = 10.0, poll: float = 0.02) -> None:
        """Poll until the control socket accepts, which the double does only once its API
        socket listens; TimeoutError after `timeout` seconds."""
        async with asyncio.timeout(timeout):
            while True:
                try:
                    _, writer = await asyncio.open_unix_connection(self.path)
                except (FileNotFoundError, ConnectionRefusedError):
                    await asyncio.sleep(poll)
                    continue
                writer.close()
                with contextlib.suppress(ConnectionError):
                    await writer.wait_closed()
                return


async def read_ready_line(stdout: asyncio.StreamReader) -> int:
    """Read the double's `ready pid=<pid>` line from its stdout; the pid.

    Raises EOFError when the process ended (e.g. refused to start) before it was ready.
    """
    line = (await stdout.readline()).decode()
    if not line.startswith(READY_PREFIX):
        raise EOFError(f"the CH double did not become ready: {line!r}")
    return int(line[len(READY_PREFIX) :])
