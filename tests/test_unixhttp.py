"""The HTTP client against real unix sockets: CH's wire format and hostile peers."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from watcher import unixhttp

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@pytest.fixture
async def serve(tmp_path: Path) -> AsyncIterator[Callable[[Handler], Awaitable[str]]]:
    servers: list[asyncio.Server] = []

    async def start(handler: Handler) -> str:
        async def closing(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                await handler(reader, writer)
            except ConnectionError:
                pass  # the client hung up on a hostile handler: that is the point
            finally:
                writer.close()

        path = str(tmp_path / f"s{len(servers)}.sock")
        servers.append(await asyncio.start_unix_server(closing, path))
        return path

    yield start
    for server in servers:
        server.close()
        await server.wait_closed()


async def read_head(reader: asyncio.StreamReader) -> bytes:
    return await reader.readuntil(b"\r\n\r\n")


async def test_ch_wire_format_204_without_reason_or_length(
    serve: Callable[[Handler], Awaitable[str]],
) -> None:
    seen: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await read_head(reader)
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        seen.append(head + await reader.readexactly(length))
        writer.write(
            b"HTTP/1.1 204 \r\nServer: Cloud Hypervisor API\r\nConnection: keep-alive\r\n\r\n"
        )
        await writer.drain()
        await reader.read()  # CH never closes: wait for the client to hang up

    path = await serve(handler)
    response = await unixhttp.request(path, "PUT", "/api/v1/vm.add-fs", b'{"tag":"a"}', timeout=5)
    assert response == unixhttp.HttpResponse(204, b"")
    assert seen[0].startswith(b"PUT /api/v1/vm.add-fs HTTP/1.1\r\n")
    assert b"Content-Length: 11\r\n" in seen[0]
    assert seen[0].endswith(b'{"tag":"a"}')


async def test_200_with_json_body_on_a_connection_ch_keeps_open(
    serve: Callable[[Handler], Awaitable[str]],
) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        body = b'{"version":"53.0.0","pid":7}'
        writer.write(
            b"HTTP/1.1 200 \r\nServer: Cloud Hypervisor API\r\nConnection: keep-alive\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        await writer.drain()
        await reader.read()

    path = await serve(handler)
    response = await unixhttp.request(path, "GET", "/api/v1/vmm.ping", timeout=5)
    assert (response.status, response.body) == (200, b'{"version":"53.0.0","pid":7}')


async def test_hung_peer_times_out(serve: Callable[[Handler], Awaitable[str]]) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()

    path = await serve(handler)
    with pytest.raises(TimeoutError):
        await unixhttp.request(path, "GET", "/api/v1/vmm.ping", timeout=0.2)


async def test_endless_header_flood_is_cut_off(serve: Callable[[Handler], Awaitable[str]]) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(b"HTTP/1.1 200 \r\n")
        for _ in range(10_000):  # 250 KiB of headers, never ending the head
            writer.write(b"X-Flood: aaaaaaaaaaaaaa\r\n")
            await writer.drain()

    path = await serve(handler)
    with pytest.raises(unixhttp.HttpProtocolError):
        await unixhttp.request(path, "GET", "/api/v1/vmm.ping", timeout=10)


async def test_oversized_body_is_refused(serve: Callable[[Handler], Awaitable[str]]) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(b"HTTP/1.1 200 \r\nContent-Length: 100000000\r\n\r\n")
        for _ in range(100):
            writer.write(b"x" * 65536)
            await writer.drain()

    path = await serve(handler)
    with pytest.raises(unixhttp.HttpProtocolError, match="larger than"):
        await unixhttp.request(path, "GET", "/api/v1/vm.info", timeout=10, max_body=1 << 20)


@pytest.mark.parametrize(
    "reply",
    [
        b"garbage\r\n\r\n",
        b"HTTP/1.1 abc \r\n\r\n",
        b"HTTP/1.1 200 \r\nContent-Length: 10\r\n\r\nshort",
    ],
)
async def test_malformed_or_truncated_answers_are_protocol_errors(
    serve: Callable[[Handler], Awaitable[str]], reply: bytes
) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(reply)
        await writer.drain()
        writer.close()

    path = await serve(handler)
    with pytest.raises(unixhttp.HttpProtocolError):
        await unixhttp.request(path, "GET", "/api/v1/vm.info", timeout=5)


async def test_missing_and_stale_sockets_raise_distinct_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        await unixhttp.request(str(tmp_path / "none.sock"), "GET", "/", timeout=5)
    stale = tmp_path / "stale.sock"
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(stale))
    sock.close()
    with pytest.raises(ConnectionRefusedError):
        await unixhttp.request(str(stale), "GET", "/", timeout=5)
