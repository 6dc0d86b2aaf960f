"""One bounded HTTP/1.1 exchange over a unix socket, framed by h11.

Why a fresh connection per request: CH serves one request at a time on at most
ten connections and never closes a connection itself (cloud-hypervisor-api.md
§1, §9), so a pooled connection buys nothing and a leaked one costs CH a slot.
We close our end as soon as the response is complete.

Why every step is bounded: the peer is whatever process owns the socket path. A
hung CH, a process that is not CH, or a hostile peer must not be able to hang
the daemon (one total deadline covers connect, send and receive), flood it
(response head and body sizes are capped) or crash it (every framing problem
becomes `HttpProtocolError`).
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass

import h11

MAX_HEAD_BYTES = 16 * 1024
"""CH's response heads are ~100 bytes; anything near this is not CH."""

MAX_BODY_BYTES = 1024 * 1024
"""A vm.info of a large VM is tens of KiB; a megabyte is generous and bounded."""

_READ_CHUNK = 64 * 1024


class HttpProtocolError(Exception):
    """The peer spoke something that is not a well-formed, bounded HTTP/1.1 response."""


@dataclass(frozen=True)
class HttpResponse:
    status: int
    body: bytes


async def request(
    socket_path: str,
    method: str,
    target: str,
    body: bytes | None = None,
    *,
    timeout: float,
    max_body: int = MAX_BODY_BYTES,
) -> HttpResponse:
    """Send one request and return the whole response.

    Raises the connect error as is (`FileNotFoundError`, `ConnectionRefusedError`,
    `PermissionError`: callers tell "no socket" from "stale socket" by type),
    `TimeoutError` when the deadline passes, `HttpProtocolError` for anything
    malformed or oversized. The body is always sent with Content-Length: CH does
    not decode chunked bodies (cloud-hypervisor-api.md §1).
    """
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_unix_connection(socket_path, limit=_READ_CHUNK)
        try:
            return await _exchange(reader, writer, method, target, body, max_body)
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


async def _exchange(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    method: str,
    target: str,
    body: bytes | None,
    max_body: int,
) -> HttpResponse:
    conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD_BYTES)
    headers = [("Host", "localhost"), ("Accept", "application/json")]
    if body is not None:
        headers += [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
    out = conn.send(h11.Request(method=method, target=target, headers=headers))
    if body is not None:
        out += conn.send(h11.Data(data=body))
    out += conn.send(h11.EndOfMessage())
    writer.write(out)
    await writer.drain()

    status: int | None = None
    chunks: list[bytes] = []
    size = 0
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError as exc:
            raise HttpProtocolError(f"malformed HTTP response: {exc}") from exc
        if event is h11.NEED_DATA:
            data = await reader.read(_READ_CHUNK)
            if not data:
                raise HttpProtocolError("connection closed before the response was complete")
            conn.receive_data(data)
        elif isinstance(event, h11.InformationalResponse):
            continue
        elif isinstance(event, h11.Response):
            status = event.status_code
        elif isinstance(event, h11.Data):
            size += len(event.data)
            if size > max_body:
                raise HttpProtocolError(f"response body larger than {max_body} bytes")
            chunks.append(bytes(event.data))
        elif isinstance(event, h11.EndOfMessage):
            if status is None:  # h11 orders Response first; kept for the type checker
                raise HttpProtocolError("response ended without a status line")
            return HttpResponse(status=status, body=b"".join(chunks))
        else:
            raise HttpProtocolError(f"unexpected HTTP event {type(event).__name__}")
