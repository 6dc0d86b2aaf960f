"""The frontend (VMM) side of vhost-user: just the connect and handshake Cloud Hypervisor does.

The CH test double uses this to behave like CH towards a virtiofsd: a vhost-user client that
connects to the backend's socket, negotiates features, keeps the connection for the VM's lifetime
and notices when the backend dies (cloud-hypervisor-api.md §7). The wire format (a 12-byte
little-endian header: request, flags, payload size; then the payload) also serves the stand-in
backend in `watcher.testing.fake_virtiofsd`, so both ends share the constants below.

A connection made here is not a harmless probe: virtiofsd serves exactly one frontend and exits when
it disconnects (virtiofsd.md §2), so connecting "to check" a backend uses it up.
"""

from __future__ import annotations

import asyncio
import enum
import struct

HEADER = struct.Struct("<III")
U64 = struct.Struct("<Q")

VERSION = 0x1
VERSION_MASK = 0x3
FLAG_REPLY = 0x4
FLAG_NEED_REPLY = 0x8

# Bit 30 of GET_FEATURES: the backend speaks GET/SET_PROTOCOL_FEATURES.
VHOST_USER_F_PROTOCOL_FEATURES = 1 << 30


class Request(enum.IntEnum):
    """The requests a VMM sends first; the backend double answers these and acks the rest."""

    GET_FEATURES = 1
    SET_OWNER = 3
    GET_PROTOCOL_FEATURES = 15


class VhostUserError(Exception):
    """The backend broke the protocol, or hung up before answering the handshake."""


async def connect_frontend(path: str) -> VhostUserFrontend:
    """Make one connect attempt to a backend's listening socket.

    The OSError is raised as is because its kind is the signal: CH retries only ENOENT,
    ECONNREFUSED and EINTR, every 100 ms for 60 s (cloud-hypervisor-api.md §7), and a stale socket
    file left by an exited virtiofsd gives ECONNREFUSED (virtiofsd.md §2). That retry loop is the
    caller's policy, not this function's.
    """
    reader, writer = await asyncio.open_unix_connection(path)
    return VhostUserFrontend(reader, writer)


class VhostUserFrontend:
    """One vhost-user connection, as held by a VMM's virtio-fs device."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._protocol_features: int | None = None

    async def handshake(self) -> int:
        """Negotiate like CH's `negotiate_features_vhost_user`; return the backend's feature bits.

        The order is CH's: SET_OWNER, GET_FEATURES, then GET_PROTOCOL_FEATURES only if the backend
        offers VHOST_USER_F_PROTOCOL_FEATURES. There is no timeout here because CH has none
        (cloud-hypervisor-api.md §7): a backend that accepts but never answers hangs CH, and a
        double that hid that would hide the bug. Callers wrap this in `asyncio.timeout` when they
        want one.
        """
        try:
            self._send(Request.SET_OWNER)
            self._send(Request.GET_FEATURES)
            await self._writer.drain()
            features = await self._read_u64_reply(Request.GET_FEATURES)
            if features & VHOST_USER_F_PROTOCOL_FEATURES:
                self._send(Request.GET_PROTOCOL_FEATURES)
                await self._writer.drain()
                self._protocol_features = await self._read_u64_reply(Request.GET_PROTOCOL_FEATURES)
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            raise VhostUserError("backend hung up during the vhost-user handshake") from exc
        return features

    @property
    def protocol_features(self) -> int | None:
        """GET_PROTOCOL_FEATURES' answer, or None if not offered or no handshake yet."""
        return self._protocol_features

    async def wait_hangup(self) -> None:
        """Return when the backend closes the connection, i.e. when the virtiofsd has died.

        This is CH's EPOLLHUP on the vhost-user socket, its cue to reconnect
        (cloud-hypervisor-api.md §7). Also returns after our own `close()`.
        """
        try:
            data = await self._reader.read(HEADER.size)
        except ConnectionResetError:
            return
        if data:
            # After the handshake a backend only ever answers requests; it never speaks first.
            raise VhostUserError(f"unsolicited {len(data)} bytes from the backend")

    def close(self) -> None:
        """Close our end, as CH does on shutdown or reboot: a virtiofsd then exits with rc 0."""
        self._writer.close()

    @property
    def closed(self) -> bool:
        """True once `close()` was called (a backend hangup alone does not close our end)."""
        return self._writer.is_closing()

    def _send(self, request: Request) -> None:
        self._writer.write(HEADER.pack(request, VERSION, 0))

    async def _read_u64_reply(self, request: Request) -> int:
        reply_request, flags, size = HEADER.unpack(await self._reader.readexactly(HEADER.size))
        if reply_request != request:
            raise VhostUserError(f"reply to request {reply_request}, expected {request.name}")
        if flags & VERSION_MASK != VERSION or not flags & FLAG_REPLY:
            raise VhostUserError(f"bad reply flags {flags:#x} to {request.name}")
        if size != U64.size:
            raise VhostUserError(f"{request.name} reply payload is {size} bytes, expected 8")
        (value,) = U64.unpack(await self._reader.readexactly(U64.size))
        return int(value)
