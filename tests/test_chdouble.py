"""The Cloud Hypervisor double against what CH does (cloud-hypervisor-api.md).

Everything is real: the double serves a real unix socket, wire-format tests speak raw bytes,
backends are `fake_virtiofsd` processes doing the real vhost-user handshake, and the process
mode is a subprocess. Waiting is on the double's state (`wait_until`), on process exits, or on
a backend's readiness line, never on a clock; per-release expectations are parametrized.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import stat
import sys
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import h11
import pytest

from watcher.testing.chdouble import CloudHypervisorDouble, DoubleStartError
from watcher.testing.chdouble_control import DoubleControl, read_ready_line
from watcher.testing.chdouble_http import SERVER_FULL, HttpRequest, RequestParser
from watcher.testing.chdouble_profiles import PROFILE_NAMES, ProfileName
from watcher.testing.chdouble_routes import NOT_SIMULATED

DEADLINE = 10.0  # only bounds a hang; nothing here measures speed
REAL_VIRTIOFSD = Path("/usr/lib/qemu/virtiofsd")  # Debian 12's legacy C virtiofsd
REAL_LOCK_DIR = Path("/run/virtiofsd")
"""With --socket-path (not --fd) the legacy virtiofsd flocks <this>/<path, '/' as '.'>.pid and
never removes it; it has no option to put it elsewhere."""
BACKEND_READY = b"Waiting for vhost-user socket connection"
NOT_CREATED_STATUS = {"v47": 500, "v52": 500, "v53": 404, "head": 404}
ADD_FS = ["Error from API", "The fs could not be added to the VM"]
REMOVE = ["Error from API", "The device could not be removed from the VM"]

MakeDouble = Callable[..., Awaitable[CloudHypervisorDouble]]


# ---- helpers --------------------------------------------------------------------------------


@pytest.fixture
def short_dir() -> Iterator[Path]:
    # AF_UNIX paths are limited to 107 bytes; pytest's tmp_path can be longer.
    with tempfile.TemporaryDirectory(prefix="chd", dir="/tmp") as name:
        yield Path(name)


@pytest.fixture
def api_path(short_dir: Path) -> str:
    return str(short_dir / "api.sock")


@pytest.fixture
async def make_double(api_path: str) -> AsyncIterator[MakeDouble]:
    doubles: list[CloudHypervisorDouble] = []

    async def make(**options: Any) -> CloudHypervisorDouble:
        options.setdefault("connect_timeout", 5.0)
        double = CloudHypervisorDouble(options.pop("api_socket", api_path), **options)
        doubles.append(double)
        await double.start()
        return double

    yield make
    for double in doubles:
        await double.stop(clean=False)


class Backends:
    """fake_virtiofsd processes, each serving one vhost-user connection on a socket path."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.processes: list[asyncio.subprocess.Process] = []
        self.lock_files: list[Path] = []

    def path(self, name: str) -> str:
        return str(self.directory / f"{name}.vfs")

    async def start(self, name: str, *, real: bool = False) -> asyncio.subprocess.Process:
        if real:
            share = self.directory / f"{name}.share"
            share.mkdir(exist_ok=True)
            argv = [
                str(REAL_VIRTIOFSD),
                f"--socket-path={self.path(name)}",
                "-o",
                f"source={share}",
            ]
            self.lock_files.append(REAL_LOCK_DIR / f"{self.path(name).replace('/', '.')}.pid")
        else:
            argv = [sys.executable, "-m", "watcher.testing.fake_virtiofsd"]
            argv.append(f"--socket-path={self.path(name)}")
        process = await asyncio.create_subprocess_exec(*argv, stderr=asyncio.subprocess.PIPE)
        self.processes.append(process)
        assert process.stderr is not None
        async with asyncio.timeout(DEADLINE):
            while BACKEND_READY not in await process.stderr.readline():
                pass
        return process

    def kill_all(self) -> None:
        for process in self.processes:
            if process.returncode is None:
                process.kill()


@pytest.fixture
async def backends(short_dir: Path) -> AsyncIterator[Backends]:
    pool = Backends(short_dir)
    yield pool
    pool.kill_all()
    for process in pool.processes:
        await process.wait()
    for lock_file in pool.lock_files:
        lock_file.unlink(missing_ok=True)
    ours = str(short_dir).replace("/", ".")
    left = [p.name for p in REAL_LOCK_DIR.glob("*.pid") if p.name.startswith(ours)]
    assert not left, f"left behind in {REAL_LOCK_DIR}: {left}"


async def call(
    path: str, method: str, name: str, body: Any = None, *, raw_body: bytes | None = None
) -> tuple[int, Any]:
    """One request on its own connection, framed by h11; the status and the decoded body."""
    data = (
        raw_body if raw_body is not None else (None if body is None else json.dumps(body).encode())
    )
    client = h11.Connection(h11.CLIENT)
    headers = [("Host", "localhost")]
    if data is not None:
        headers.append(("Content-Length", str(len(data))))
    reader, writer = await asyncio.open_unix_connection(path)
    try:
        writer.write(
            client.send(h11.Request(method=method, target=f"/api/v1/{name}", headers=headers))
        )
        if data is not None:
            writer.write(client.send(h11.Data(data=data)))
        writer.write(client.send(h11.EndOfMessage()))
        status, payload = 0, b""
        async with asyncio.timeout(DEADLINE):
            while True:
                event = client.next_event()
                if event is h11.NEED_DATA:
                    client.receive_data(await reader.read(65536))
                elif isinstance(event, h11.Response):
                    status = event.status_code
                elif isinstance(event, h11.Data):
                    payload += event.data
                elif isinstance(event, h11.EndOfMessage):
                    break
    finally:
        writer.close()
    return status, json.loads(payload) if payload else None


async def read_response(reader: asyncio.StreamReader) -> bytes:
    """The exact bytes of one response: the head, then Content-Length bytes of body."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    return head + await reader.readexactly(length)


async def raw_exchange(path: str, request: bytes, responses: int = 1) -> list[bytes]:
    reader, writer = await asyncio.open_unix_connection(path)
    try:
        writer.write(request)
        async with asyncio.timeout(DEADLINE):
            return [await read_response(reader) for _ in range(responses)]
    finally:
        writer.close()


def fs_body(name: str, socket_path: str, **extra: Any) -> dict[str, Any]:
    return {"tag": name, "socket": socket_path, "id": name, **extra}


def tree(double: CloudHypervisorDouble) -> dict[str, Any]:
    info = double.info()
    assert info is not None
    return dict(info.get("device_tree") or {})


def stale_socket(path: str) -> None:
    """A socket file with no listener, as a crashed CH leaves it."""
    leftover = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    leftover.bind(path)
    leftover.close()


# ---- wire format ------------------------------------------------------------------------------


async def test_204_and_200_are_micro_http_bytes(make_double: MakeDouble, api_path: str) -> None:
    await make_double(pid=4242)
    paused, ping = await raw_exchange(
        api_path,
        b"PUT /api/v1/vm.pause HTTP/1.1\r\nHost: localhost\r\n\r\n"
        b"GET /api/v1/vmm.ping HTTP/1.1\r\nHost: localhost\r\n\r\n",
        responses=2,
    )
    assert (
        paused == b"HTTP/1.1 204 \r\nServer: Cloud Hypervisor API\r\nConnection: keep-alive\r\n\r\n"
    )
    body = (
        b'{"build_version":"v53.0-246-gae44c2971","version":"54.0.0","pid":4242,'
        b'"features":["io_uring","kvm"]}'
    )
    assert ping == (
        b"HTTP/1.1 200 \r\nServer: Cloud Hypervisor API\r\nConnection: keep-alive\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    )


async def test_keep_alive_serves_requests_in_turn_on_one_connection(
    make_double: MakeDouble, api_path: str
) -> None:
    await make_double()
    reader, writer = await asyncio.open_unix_connection(api_path)
    try:
        for _ in range(2):
            writer.write(b"GET /api/v1/vmm.ping HTTP/1.1\r\n\r\n")  # no Host: micro_http allows it
            async with asyncio.timeout(DEADLINE):
                assert (await read_response(reader)).startswith(b"HTTP/1.1 200 \r\n")
        assert not reader.at_eof()
    finally:
        writer.close()


async def test_pipelined_requests_are_answered_in_order(
    make_double: MakeDouble, api_path: str
) -> None:
    await make_double(vm="none")
    answers = await raw_exchange(
        api_path,
        b"GET /api/v1/vm.info HTTP/1.1\r\n\r\n"
        b"GET /api/v1/nope HTTP/1.1\r\n\r\n"
        b"GET /api/v1/vmm.ping?x=1 HTTP/1.1\r\n\r\n"
        b"GET /api/v1/vmm.ping HTTP/1.1\r\n\r\n",
        responses=4,
    )
    assert answers[0].endswith(
        b'["Error from API","The VM info is not available","VM is not created"]'
    )
    assert answers[1].startswith(b"HTTP/1.1 404 \r\n")
    assert answers[1].endswith(b'["Not Found"]')
    assert answers[2].startswith(b"HTTP/1.1 404 \r\n")  # routes match exactly, query included
    assert answers[3].startswith(b"HTTP/1.1 200 \r\n")


async def test_eleventh_connection_gets_the_raw_503(make_double: MakeDouble, api_path: str) -> None:
    await make_double()
    writers = []
    try:
        for _ in range(10):
            reader, writer = await asyncio.open_unix_connection(api_path)
            writers.append(writer)
            writer.write(b"GET /api/v1/vmm.ping HTTP/1.1\r\n\r\n")
            async with asyncio.timeout(DEADLINE):
                await read_response(reader)
        reader, writer = await asyncio.open_unix_connection(api_path)
        writers.append(writer)
        async with asyncio.timeout(DEADLINE):
            assert await reader.read() == SERVER_FULL  # then EOF: the stream is dropped
    finally:
        for writer in writers:
            writer.close()
    assert SERVER_FULL.endswith(
        b'Content-Length: 40\r\n\r\n{ "error": "Too many open connections" }'
    )


@pytest.mark.parametrize(("profile", "size"), [("v53", 51_201), ("head", (4 << 20) + 1)])
async def test_oversize_body_gets_micro_http_400(
    make_double: MakeDouble, api_path: str, profile: ProfileName, size: int
) -> None:
    await make_double(profile=profile)
    limit = size - 1
    head = b"PUT /api/v1/vm.add-fs HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % size
    rejected, ping = await raw_exchange(
        api_path, head + b" " * size + b"GET /api/v1/vmm.ping HTTP/1.1\r\n\r\n", responses=2
    )
    body = (
        b'{ "error": "Request payload with size %d is larger than the limit of %d allowed by '
        b'server.\nAll previous unanswered requests will be dropped." }' % (size, limit)
    )
    assert rejected == (
        b"HTTP/1.1 400 \r\nServer: Firecracker API\r\nConnection: keep-alive\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    assert ping.startswith(b"HTTP/1.1 200 \r\n")  # the connection stays open


async def test_body_at_the_limit_is_read(make_double: MakeDouble, api_path: str) -> None:
    await make_double(profile="v52")
    padded = json.dumps({"id": "nothing", "pad": "x" * 51_000}).encode()
    status, body = await call(api_path, "PUT", "vm.remove-device", raw_body=padded.ljust(51_200))
    assert (status, body[-1]) == (
        500,
        "Failed to find device corresponding to the given identifier: nothing",
    )


async def test_post_is_a_micro_http_parse_error(make_double: MakeDouble, api_path: str) -> None:
    await make_double()
    (answer,) = await raw_exchange(api_path, b"POST /api/v1/vm.boot HTTP/1.1\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400 \r\nServer: Firecracker API\r\n")
    assert answer.endswith(
        b'{ "error": "Invalid HTTP Method: Unsupported HTTP method.\n'
        b'All previous unanswered requests will be dropped." }'
    )
    with pytest.raises(json.JSONDecodeError):
        json.loads(answer.split(b"\r\n\r\n", 1)[1])


async def test_header_line_must_fit_micro_http_buffer(
    make_double: MakeDouble, api_path: str
) -> None:
    await make_double()
    fits = b"X-Pad: " + b"a" * (1022 - 7)  # 1022 bytes + CRLF = micro_http's 1024-byte buffer
    too_long = fits + b"a"
    (ok,) = await raw_exchange(api_path, b"GET /api/v1/vmm.ping HTTP/1.1\r\n%s\r\n\r\n" % fits)
    assert ok.startswith(b"HTTP/1.1 200 \r\n")
    (rejected,) = await raw_exchange(
        api_path, b"GET /api/v1/vmm.ping HTTP/1.1\r\n%s\r\n\r\n" % too_long
    )
    assert rejected.startswith(b"HTTP/1.1 400 \r\nServer: Firecracker API\r\n")
    quoted = (too_long + b"\r")[:1024]
    assert (
        b'{ "error": "Invalid header. Reason: Invalid content length. Header: ' + quoted in rejected
    )


def test_request_framing_does_not_depend_on_how_bytes_arrive() -> None:
    stream = (
        b'PUT /api/v1/vm.remove-device HTTP/1.1\r\nContent-Length: 10\r\n\r\n{"id":"x"}'
        b"GET /api/v1/vmm.ping HTTP/1.1\r\n\r\n"
    )
    expected = [
        HttpRequest("PUT", "/api/v1/vm.remove-device", b'{"id":"x"}'),
        HttpRequest("GET", "/api/v1/vmm.ping", None),
    ]
    assert RequestParser(51_200).feed(stream) == expected
    parser = RequestParser(51_200)
    assert [item for byte in stream for item in parser.feed(bytes([byte]))] == expected


async def test_api_socket_is_created_0700(make_double: MakeDouble, api_path: str) -> None:
    await make_double()
    mode = os.stat(api_path).st_mode
    assert stat.S_ISSOCK(mode)
    assert stat.S_IMODE(mode) == 0o700


async def test_method_and_body_rules(make_double: MakeDouble, api_path: str) -> None:
    await make_double()
    assert await call(api_path, "PUT", "vm.boot", {"x": 1}) == (400, ["Bad Request"])
    assert await call(api_path, "GET", "vm.add-fs") == (400, ["Bad Request"])
    assert await call(api_path, "PUT", "vm.add-fs") == (400, ["Bad Request"])
    assert await call(api_path, "PUT", "vm.info") == (400, ["Bad Request"])
    assert await call(api_path, "PATCH", "vm.boot") == (400, None)  # VmActionHandler: empty 400
    assert await call(api_path, "PUT", "vm.create") == (400, None)
    assert await call(api_path, "DELETE", "vm.info") == (400, ["Bad Request"])
    assert (await call(api_path, "GET", "vmm.ping", raw_body=b"not json"))[0] == 200
    assert await call(api_path, "PUT", "vm.add-disk", {"path": "/img"}) == (
        500,
        ["Error from API", "The disk could not be added to the VM", NOT_SIMULATED],
    )
    assert await call(api_path, "PUT", "vm.add-fs", raw_body=b'{"socket":"/x.sock"}') == (
        400,
        ["Failed to deserialize JSON", "missing field `tag` at line 1 column 20"],
    )
    status, body = await call(api_path, "PUT", "vm.add-fs", raw_body=b'{"tag": ')
    assert (status, body[0]) == (400, "Failed to deserialize JSON")
    assert body[1].startswith("EOF while parsing")


@pytest.mark.parametrize(
    ("profile", "body", "message"),
    [
        ("head", b" ", "EOF while parsing a value at line 1 column 1"),
        ("head", b"{", "EOF while parsing an object at line 1 column 1"),
        ("head", b'{"tag": ', "EOF while parsing a value at line 1 column 8"),
        ("head", b'{"tag":"t",}', "trailing comma at line 1 column 12"),
        ("head", b"[]", "invalid type: sequence, expected struct FsConfig at line 1 column 2"),
        (
            "head",
            b'{"tag":"t","socket":"/s","num_queues":"2"}',
            'invalid type: string "2", expected usize at line 1 column 41',
        ),
        # From v52 `pci_segment` is a flattened field, checked once the object has been read.
        (
            "head",
            b'{"tag":"t","socket":"/s","pci_segment":-1}',
            "invalid value: integer `-1`, expected u16 at line 1 column 42",
        ),
        (
            "v47",
            b'{"tag":"t","socket":"/s","pci_segment":-1}',
            "invalid value: integer `-1`, expected u16 at line 1 column 41",
        ),
    ],
)
async def test_serde_json_messages(
    make_double: MakeDouble, api_path: str, profile: ProfileName, body: bytes, message: str
) -> None:
    await make_double(profile=profile)
    request = b"PUT /api/v1/vm.add-fs HTTP/1.1\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    (answer,) = await raw_exchange(api_path, request)
    assert json.loads(answer.split(b"\r\n\r\n", 1)[1]) == ["Failed to deserialize JSON", message]


async def test_expect_continue_and_absolute_form_target(
    make_double: MakeDouble, api_path: str
) -> None:
    await make_double(vm="created")
    body = b'{"tag":"t","socket":"/s"}'
    interim, added = await raw_exchange(
        api_path,
        b"PUT http://localhost/api/v1/vm.add-fs HTTP/1.1\r\nExpect: 100-continue\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body),
        responses=2,
    )
    assert interim == b"HTTP/1.1 100 \r\nServer: Firecracker API\r\nConnection: keep-alive\r\n\r\n"
    assert added.startswith(b"HTTP/1.1 204 \r\n")


# ---- errors per release -----------------------------------------------------------------------


@pytest.mark.parametrize("profile", PROFILE_NAMES)
async def test_add_fs_without_vm(
    make_double: MakeDouble, api_path: str, profile: ProfileName
) -> None:
    await make_double(profile=profile, vm="none")
    assert await call(api_path, "PUT", "vm.add-fs", fs_body("myfs0", "/x.sock")) == (
        NOT_CREATED_STATUS[profile],
        [*ADD_FS, "VM is not created"],
    )


@pytest.mark.parametrize(
    ("profile", "status"), [("v47", 500), ("v52", 500), ("v53", 500), ("head", 409)]
)
async def test_add_fs_duplicate_id_in_config(
    make_double: MakeDouble, api_path: str, profile: ProfileName, status: int
) -> None:
    await make_double(profile=profile, vm="created")
    assert await call(api_path, "PUT", "vm.add-fs", fs_body("myfs0", "/a.sock")) == (204, None)
    assert await call(api_path, "PUT", "vm.add-fs", fs_body("myfs0", "/b.sock")) == (
        status,
        [*ADD_FS, "Failed to validate config", "Identifier myfs0 is not unique"],
    )


@pytest.mark.parametrize(
    ("profile", "status"), [("v47", 500), ("v52", 500), ("v53", 500), ("head", 400)]
)
async def test_add_fs_needs_shared_memory(
    make_double: MakeDouble, api_path: str, profile: ProfileName, status: int
) -> None:
    await make_double(profile=profile, memory_shared=False)
    assert await call(api_path, "PUT", "vm.add-fs", fs_body("myfs0", "/a.sock")) == (
        status,
        [
            *ADD_FS,
            "Failed to validate config",
            "Using vhost-user requires using shared memory or huge pages",
        ],
    )


@pytest.mark.parametrize(
    ("profile", "status", "message"),
    [
        ("v47", 500, "Number of vCPUs is insufficient for number of queues"),
        ("v52", 500, "Queue count (2) must not exceed boot vCPUs (1)"),
        ("v53", 500, "Queue count (2) must not exceed boot vCPUs (1)"),
        ("head", 400, "Queue count (2) must not exceed boot vCPUs (1)"),
    ],
)
async def test_add_fs_too_many_queues(
    make_double: MakeDouble, api_path: str, profile: ProfileName, status: int, message: str
) -> None:
    await make_double(profile=profile, boot_vcpus=1)
    body = fs_body("myfs0", "/a.sock", num_queues=2)
    assert await call(api_path, "PUT", "vm.add-fs", body) == (
        status,
        [*ADD_FS, "Failed to validate config", message],
    )


@pytest.mark.parametrize(
    ("profile", "accepted"), [("v47", True), ("v52", True), ("v53", False), ("head", False)]
)
async def test_queue_size_checked_from_v53(
    make_double: MakeDouble, api_path: str, profile: ProfileName, accepted: bool
) -> None:
    await make_double(profile=profile, vm="created")
    status, body = await call(
        api_path, "PUT", "vm.add-fs", fs_body("q", "/a.sock", queue_size=1000)
    )
    if accepted:
        assert status == 204
    else:
        assert body[-1] == "Queue size must be a power of 2 no greater than 32768: 1000"


@pytest.mark.parametrize(
    ("profile", "booted_status", "cold_status"),
    [("v47", 500, 500), ("v52", 500, 500), ("v53", 500, 500), ("head", 404, 404)],
)
async def test_remove_unknown_id(
    make_double: MakeDouble,
    short_dir: Path,
    profile: ProfileName,
    booted_status: int,
    cold_status: int,
) -> None:
    booted = str(short_dir / "booted.sock")
    created = str(short_dir / "created.sock")
    await make_double(api_socket=booted, profile=profile, pid=1)
    await make_double(api_socket=created, profile=profile, pid=2, vm="created")
    assert await call(booted, "PUT", "vm.remove-device", {"id": "foo"}) == (
        booted_status,
        [
            *REMOVE,
            "Error from device manager",
            "Failed to find device corresponding to the given identifier: foo",
        ],
    )
    assert await call(created, "PUT", "vm.remove-device", {"id": "foo"}) == (
        cold_status,
        [*REMOVE, 'No device with id "foo" to remove'],
    )


async def test_not_created_and_state_errors(make_double: MakeDouble, api_path: str) -> None:
    await make_double(profile="v53", vm="none")
    assert await call(api_path, "PUT", "vm.boot") == (
        404,
        ["Error from API", "The VM could not boot", "VM config is missing"],
    )
    assert await call(api_path, "PUT", "vm.reboot") == (
        404,
        ["Error from API", "The VM could not reboot", "VM is not created"],
    )
    assert await call(api_path, "PUT", "vm.create", {"memory": {"size": 1 << 30}}) == (204, None)
    assert await call(api_path, "PUT", "vm.shutdown") == (
        500,
        ["Error from API", "The VM could not shutdown", "VM is not running"],
    )
    assert await call(api_path, "PUT", "vm.boot") == (204, None)
    assert await call(api_path, "PUT", "vm.resume") == (
        500,
        [
            "Error from API",
            "The VM could not resume",
            "Cannot resume VM",
            "Failed to resume migratable component",
            "Invalid transition: InvalidStateTransition(Running, Running)",
        ],
    )
    assert await call(api_path, "PUT", "vm.create", {}) == (
        500,
        ["Error from API", "The VM could not be created", "VM is already created"],
    )


# ---- vm.info ----------------------------------------------------------------------------------


@pytest.mark.parametrize("profile", PROFILE_NAMES)
async def test_vm_info_shape(make_double: MakeDouble, api_path: str, profile: ProfileName) -> None:
    await make_double(profile=profile, vm="created")
    status, info = await call(api_path, "GET", "vm.info")
    assert status == 200
    assert info["state"] == "Created"
    omitted = profile in ("v53", "head")
    assert ("fs" not in info["config"]) if omitted else (info["config"]["fs"] is None)
    assert ("device_tree" not in info) if omitted else (info["device_tree"] is None)
    await call(api_path, "PUT", "vm.add-fs", {"tag": "t", "socket": "/a.sock"})
    _, info = await call(api_path, "GET", "vm.info")
    (entry,) = info["config"]["fs"]
    expected = {
        "v47": [
            ("tag", "t"),
            ("socket", "/a.sock"),
            ("num_queues", 1),
            ("queue_size", 1024),
            ("id", None),
            ("pci_segment", 0),
        ],
        "v52": [
            ("id", None),
            ("pci_segment", 0),
            ("pci_device_id", None),
            ("tag", "t"),
            ("socket", "/a.sock"),
            ("num_queues", 1),
            ("queue_size", 1024),
        ],
    }
    modern = [("pci_segment", 0), ("tag", "t"), ("socket", "/a.sock"), ("num_queues", 1)]
    expected["v53"] = expected["head"] = [*modern, ("queue_size", 1024)]
    assert list(entry.items()) == expected[profile]  # cold entries have no id before boot
    assert info["config"]["memory"]["shared"] is True


# ---- backends -----------------------------------------------------------------------------------


async def test_cold_add_then_boot_connects(
    make_double: MakeDouble, api_path: str, backends: Backends
) -> None:
    double = await make_double(vm="created")
    backend = await backends.start("cold")
    assert await call(
        api_path, "PUT", "vm.add-fs", {"tag": "t", "socket": backends.path("cold")}
    ) == (
        204,
        None,
    )
    assert double.connect_attempts(backends.path("cold")) == []  # cold add: config only
    assert await call(api_path, "PUT", "vm.boot") == (204, None)
    _, info = await call(api_path, "GET", "vm.info")
    assert info["config"]["fs"][0]["id"] == "_fs0"  # generated and written back at boot
    assert info["device_tree"]["_virtio-pci-_fs0"]["pci_bdf"] == "0000:00:06.0"
    assert double.backend_connected("_fs0")
    assert backend.returncode is None


async def test_generated_ids_share_one_counter(
    make_double: MakeDouble, api_path: str, backends: Backends
) -> None:
    double = await make_double(vm="none")
    await backends.start("one")
    await backends.start("two")
    config = {
        "memory": {"size": 1 << 30, "shared": True},
        "disks": [{"path": "/img"}],
        "fs": [{"tag": "one", "socket": backends.path("one")}],
    }
    assert await call(api_path, "PUT", "vm.create", config) == (204, None)
    assert await call(api_path, "PUT", "vm.boot") == (204, None)
    hot = {"tag": "two", "socket": backends.path("two")}
    assert await call(api_path, "PUT", "vm.add-fs", hot) == (
        200,
        {"id": "_fs2", "bdf": "0000:00:07.0"},
    )
    _, info = await call(api_path, "GET", "vm.info")
    assert info["config"]["disks"][0]["id"] == "_disk0"
    assert [entry["id"] for entry in info["config"]["fs"]] == ["_fs1", "_fs2"]
    assert double.connected_backends() == ["_fs1", "_fs2"]


async def test_hot_add_then_remove_and_eject_releases_the_backend(
    make_double: MakeDouble, api_path: str, backends: Backends
) -> None:
    double = await make_double(eject="manual")
    backend = await backends.start("hot")
    tag = "t" * 40
    assert await call(
        api_path, "PUT", "vm.add-fs", fs_body("myfs0", backends.path("hot"), tag=tag)
    ) == (
        200,
        {"id": "myfs0", "bdf": "0000:00:06.0"},
    )
    assert double.backend_connected("myfs0")
    assert double.guest_tag("myfs0") == b"t" * 36
    assert await call(api_path, "PUT", "vm.remove-device", {"id": "myfs0"}) == (204, None)
    _, info = await call(api_path, "GET", "vm.info")
    assert info["config"]["fs"] == []
    assert {"myfs0", "_virtio-pci-myfs0"} <= set(info["device_tree"])
    assert await call(api_path, "PUT", "vm.remove-device", {"id": "myfs0"}) == (204, None)
    assert backend.returncode is None  # the guest has not ejected: still connected
    await double.eject("myfs0")
    async with asyncio.timeout(DEADLINE):
        assert await backend.wait() == 0
    assert "myfs0" not in tree(double)
    assert double.events[-1] == {
        "source": "vm",
        "event": "device-removed",
        "properties": {"id": "myfs0", "bdf": "0000:00:06.0"},
    }


async def test_taken_pci_device_id_fails_after_the_backend_connected(
    make_double: MakeDouble, api_path: str, backends: Backends
) -> None:
    await make_double()
    await backends.start("one")
    second = await backends.start("two")
    first = fs_body("one", backends.path("one"), pci_device_id=9)
    assert await call(api_path, "PUT", "vm.add-fs", first) == (
        200,
        {"id": "one", "bdf": "0000:00:09.0"},
    )
    clash = fs_body("two", backends.path("two"), pci_device_id=9)
    assert await call(api_path, "PUT", "vm.add-fs", clash) == (
        500,
        [
            *ADD_FS,
            "Error from device manager",
            "Failed to find an available PCI device ID",
            "Valid PCI device identifier but already used: 9",
        ],
    )
    assert await second.wait() == 0  # it was connected, then dropped


@pytest.mark.skipif(not REAL_VIRTIOFSD.exists(), reason="no legacy virtiofsd (qemu-system-common)")
async def test_real_virtiofsd_is_served_and_released_like_by_ch(
    make_double: MakeDouble, api_path: str, backends: Backends
) -> None:
    double = await make_double(eject="manual")
    backend = await backends.start("real", real=True)
    assert await call(api_path, "PUT", "vm.add-fs", fs_body("myfs0", backends.path("real"))) == (
        200,
        {"id": "myfs0", "bdf": "0000:00:06.0"},
    )
    assert await call(api_path, "PUT", "vm.remove-device", {"id": "myfs0"}) == (204, None)
    await double.eject("myfs0")
    async with asyncio.timeout(DEADLINE):
        assert await backend.wait() == 0


@pytest.mark.parametrize("profile", PROFILE_NAMES)
async def test_readd_before_eject_fails_on_the_device_tree(
    make_double: MakeDouble, api_path: str, backends: Backends, profile: ProfileName
) -> None:
    await make_double(profile=profile, eject="manual")
    await backends.start("one")
    assert (await call(api_path, "PUT", "vm.add-fs", fs_body("myfs0", backends.path("one"))))[
        0
    ] == 200
    assert await call(api_path, "PUT", "vm.remove-device", {"id": "myfs0"}) == (204, None)
    assert await call(api_path, "PUT", "vm.add-fs", fs_body("myfs0", backends.path("two"))) == (
        500,
        [*ADD_FS, "Error from device manager", "Invalid identifier as it is not unique: myfs0"],
    )


async def test_auto_eject_frees_id_and_slot(
    make_double: MakeDouble, api_path: str, backends: Backends
) -> None:
    double = await make_double()
    first = await backends.start("first")
    await call(api_path, "PUT", "vm.add-fs", fs_body("myfs0", backends.path("first")))
    await call(api_path, "PUT", "vm.remove-device", {"id": "myfs0"})
    await double.wait_until(lambda: "myfs0" not in tree(double))
    assert await first.wait() == 0
    await backends.start("second")
    assert await call(api_path, "PUT", "vm.add-fs", fs_body("myfs0", backends.path("second"))) == (
        200,
        {"id": "myfs0", "bdf": "0000:00:06.0"},
    )


@pytest.mark.parametrize(
    ("profile", "tail"),
    [
        ("v47", ["Connection to socket failed"]),
        (
            "v52",
            [
                "Connection to socket failed",
                "vhost-user: can't connect to peer: No such file or directory (os error 2)",
            ],
        ),
        (
            "v53",
            [
                "Connection to socket failed",
                "vhost-user: can't connect to peer: No such file or directory (os error 2)",
            ],
        ),
        ("head", ["Timed out waiting for vhost-user connection"]),
    ],
)
async def test_missing_backend_times_out_with_the_release_chain(
    make_double: MakeDouble,
    api_path: str,
    backends: Backends,
    profile: ProfileName,
    tail: list[str],
) -> None:
    double = await make_double(profile=profile, connect_timeout=0.3)
    assert await call(api_path, "PUT", "vm.add-fs", fs_body("myfs0", backends.path("none"))) == (
        500,
        [*ADD_FS, "Error from device manager", "Cannot create virtio-fs device", *tail],
    )
    assert len(double.connect_attempts(backends.path("none"))) > 1  # retried in the window
    _, info = await call(api_path, "GET", "vm.info")
    assert "myfs0" not in info["device_tree"]
    assert not info["config"].get("fs")


async def test_slow_add_fs_blocks_ping_on_other_connections(
    make_double: MakeDouble, api_path: str, backends: Backends
) -> None:
    # The add-fs cannot end before its backend exists, and the test starts that backend only
    # once the ping is on the wire: the order below holds however slow the machine is.
    double = await make_double(connect_timeout=DEADLINE)
    path = backends.path("late")
    add = asyncio.create_task(call(api_path, "PUT", "vm.add-fs", fs_body("myfs0", path)))
    await double.wait_until(lambda: len(double.connect_attempts(path)) >= 1)
    reader, writer = await asyncio.open_unix_connection(api_path)
    try:
        writer.write(b"GET /api/v1/vmm.ping HTTP/1.1\r\n\r\n")
        await writer.drain()
        # One API thread, busy with the add-fs: the ping is not even read yet (§9).
        assert [record.path for record in double.requests] == ["/api/v1/vm.add-fs"]
        await backends.start("late")
        assert (await add)[0] == 200
        async with asyncio.timeout(DEADLINE):
            assert (await read_response(reader)).startswith(b"HTTP/1.1 200 \r\n")
    finally:
        writer.close()
    add_record, ping_record = double.requests
    assert add_record.finished_at is not None
    assert add_record.finished_at <= ping_record.received_at


async def test_backend_appearing_within_the_window_is_used(
    make_double: MakeDouble, api_path: str, backends: Backends
) -> None:
    double = await make_double(connect_timeout=DEADLINE)
    path = backends.path("late")
    add = asyncio.create_task(call(api_path, "PUT", "vm.add-fs", fs_body("myfs0", path)))
    await double.wait_until(lambda: len(double.connect_attempts(path)) >= 1)
    await backends.start("late")
    assert await add == (200, {"id": "myfs0", "bdf": "0000:00:06.0"})
    attempts = double.connect_attempts(path)
    assert attempts[0] is not None
    assert attempts[-1] is None


@pytest.mark.parametrize(("profile", "attempts"), [("v53", "several"), ("head", "one")])
async def test_only_head_gives_up_at_once_on_other_errors(
    make_double: MakeDouble, api_path: str, short_dir: Path, profile: ProfileName, attempts: str
) -> None:
    double = await make_double(profile=profile, connect_timeout=0.3)
    (short_dir / "file").write_text("")
    path = str(short_dir / "file" / "vfs.sock")  # connect() gives ENOTDIR
    status, body = await call(api_path, "PUT", "vm.add-fs", fs_body("myfs0", path))
    assert status == 500
    assert body[-1] == "vhost-user: can't connect to peer: Not a directory (os error 20)"
    assert (len(double.connect_attempts(path)) == 1) == (attempts == "one")


async def test_reboot_reconnects_and_keeps_hot_added_fs(
    make_double: MakeDouble, api_path: str, backends: Backends
) -> None:
    double = await make_double(connect_timeout=DEADLINE)
    first = await backends.start("vfs")
    assert (await call(api_path, "PUT", "vm.add-fs", fs_body("myfs0", backends.path("vfs"))))[
        0
    ] == 200
    reboot = asyncio.create_task(call(api_path, "PUT", "vm.reboot"))
    async with asyncio.timeout(DEADLINE):
        assert await first.wait() == 0  # the reboot disconnected it
    second = await backends.start("vfs")
    assert await reboot == (204, None)
    _, info = await call(api_path, "GET", "vm.info")
    assert [entry["id"] for entry in info["config"]["fs"]] == ["myfs0"]
    assert "myfs0" in info["device_tree"]
    assert double.backend_connected("myfs0")
    assert second.returncode is None
    assert [e["event"] for e in double.events[-2:]] == ["rebooting", "rebooted"]


async def test_shutdown_then_boot_reconnects_hot_added_fs(
    make_double: MakeDouble, api_path: str, backends: Backends
) -> None:
    double = await make_double()
    first = await backends.start("vfs")
    await call(api_path, "PUT", "vm.add-fs", fs_body("myfs0", backends.path("vfs")))
    assert await call(api_path, "PUT", "vm.shutdown") == (204, None)
    assert await first.wait() == 0
    _, info = await call(api_path, "GET", "vm.info")
    assert info["state"] == "Created"
    assert "device_tree" not in info
    assert info["config"]["fs"][0]["id"] == "myfs0"  # the config outlives the Vm
    await backends.start("vfs")
    assert await call(api_path, "PUT", "vm.boot") == (204, None)
    assert double.backend_connected("myfs0")


@pytest.mark.parametrize(("profile", "status"), [("v52", 204), ("v53", 500)])
async def test_boot_on_a_paused_vm(
    make_double: MakeDouble, api_path: str, profile: ProfileName, status: int
) -> None:
    double = await make_double(profile=profile)
    await call(api_path, "PUT", "vm.pause")
    assert (await call(api_path, "PUT", "vm.boot"))[0] == status
    assert double.state == ("Running" if status == 204 else "Paused")


@pytest.mark.parametrize(("profile", "fs_kept"), [("v47", True), ("v52", False), ("head", False)])
async def test_failed_api_reboot_leaves_vm_created(
    make_double: MakeDouble, api_path: str, backends: Backends, profile: ProfileName, fs_kept: bool
) -> None:
    await make_double(profile=profile, connect_timeout=0.3)
    backend = await backends.start("vfs")
    await call(api_path, "PUT", "vm.add-fs", fs_body("myfs0", backends.path("vfs")))
    status, body = await call(api_path, "PUT", "vm.reboot")
    assert (status, body[:5]) == (
        500,
        [
            "Error from API",
            "The VM could not reboot",
            "Error from device manager",
            "Cannot create virtio-fs device",
            "Connection to socket failed"
            if profile != "head"
            else "Timed out waiting for vhost-user connection",
        ],
    )
    assert await backend.wait() == 0
    _, info = await call(api_path, "GET", "vm.info")
    assert info["state"] == "Created"
    # v52+ take config.fs while building devices and lose it when one fails (device_manager.rs).
    assert bool(info["config"].get("fs")) == fs_kept


@pytest.mark.parametrize(("profile", "socket_left"), [("head", True), ("v52", False)])
async def test_failed_guest_reboot_exits_1(
    make_double: MakeDouble,
    api_path: str,
    backends: Backends,
    profile: ProfileName,
    socket_left: bool,
) -> None:
    double = await make_double(profile=profile, connect_timeout=0.3)
    await backends.start("vfs")
    await call(api_path, "PUT", "vm.add-fs", fs_body("myfs0", backends.path("vfs")))
    assert await double.guest_reboot() is False
    assert await double.wait_exited() == 1
    assert os.path.exists(api_path) == socket_left
    with pytest.raises(ConnectionRefusedError if socket_left else FileNotFoundError):
        await asyncio.open_unix_connection(api_path)


async def test_guest_reboot_with_new_backend_succeeds(
    make_double: MakeDouble, api_path: str, backends: Backends
) -> None:
    double = await make_double(connect_timeout=DEADLINE)
    first = await backends.start("vfs")
    await call(api_path, "PUT", "vm.add-fs", fs_body("myfs0", backends.path("vfs")))
    reboot = asyncio.create_task(double.guest_reboot())
    assert await first.wait() == 0
    await backends.start("vfs")
    assert await reboot is True
    assert double.backend_connected("myfs0")
    assert double.exit_code is None


@pytest.mark.parametrize("profile", ["v52", "head"])
async def test_backend_death_marks_device_needing_reset(
    make_double: MakeDouble, api_path: str, backends: Backends, profile: ProfileName
) -> None:
    double = await make_double(profile=profile, connect_timeout=0.3)
    backend = await backends.start("vfs")
    await call(api_path, "PUT", "vm.add-fs", fs_body("myfs0", backends.path("vfs")))
    backend.kill()
    await double.wait_until(lambda: double.needs_reset("myfs0"))
    _, info = await call(api_path, "GET", "vm.info")
    assert info["config"]["fs"][0]["id"] == "myfs0"
    assert "myfs0" in info["device_tree"]
    assert double.exit_code is None


async def test_backend_death_takes_v47_down(
    make_double: MakeDouble, api_path: str, backends: Backends
) -> None:
    double = await make_double(profile="v47", connect_timeout=0.3)
    backend = await backends.start("vfs")
    await call(api_path, "PUT", "vm.add-fs", fs_body("myfs0", backends.path("vfs")))
    backend.kill()
    assert await double.wait_exited() == 0  # exit_evt -> vmm_shutdown -> Ok
    assert not os.path.exists(api_path)


async def test_backend_reconnects_after_a_restart(
    make_double: MakeDouble, api_path: str, backends: Backends
) -> None:
    double = await make_double(connect_timeout=DEADLINE)
    backend = await backends.start("vfs")
    await call(api_path, "PUT", "vm.add-fs", fs_body("myfs0", backends.path("vfs")))
    backend.kill()
    await double.wait_until(lambda: not double.backend_connected("myfs0"))
    await backends.start("vfs")
    await double.wait_until(lambda: double.backend_connected("myfs0"))
    assert not double.needs_reset("myfs0")


# ---- hang, shutdown, lifecycle -----------------------------------------------------------------


async def test_hung_vmm_reads_but_does_not_answer(make_double: MakeDouble, api_path: str) -> None:
    double = await make_double()
    double.set_hung(True)
    ping = asyncio.create_task(call(api_path, "GET", "vmm.ping"))
    await double.wait_until(
        lambda: bool(double.requests) and double.requests[0].started_at is not None
    )
    assert not ping.done()
    assert double.requests[0].finished_at is None
    double.set_hung(False)
    assert (await ping)[0] == 200


async def test_vmm_shutdown_answers_200_then_exits_cleanly(
    make_double: MakeDouble, api_path: str
) -> None:
    double = await make_double()
    (answer,) = await raw_exchange(api_path, b"PUT /api/v1/vmm.shutdown HTTP/1.1\r\n\r\n")
    assert answer == (
        b"HTTP/1.1 200 \r\nServer: Cloud Hypervisor API\r\nConnection: keep-alive\r\n"
        b"Content-Type: application/json\r\nContent-Length: 0\r\n\r\n"
    )
    assert await double.wait_exited() == 0
    assert not os.path.exists(api_path)


@pytest.mark.parametrize("profile", ["v53", "head"])
async def test_stale_socket_is_replaced_from_v53(
    make_double: MakeDouble, api_path: str, profile: ProfileName
) -> None:
    stale_socket(api_path)
    await make_double(profile=profile)
    assert (await call(api_path, "GET", "vmm.ping"))[0] == 200
    assert os.path.exists(f"{api_path}.lock")


@pytest.mark.parametrize(("profile", "path_left"), [("v47", True), ("v52", False)])
async def test_stale_socket_stops_older_releases(
    make_double: MakeDouble, api_path: str, profile: ProfileName, path_left: bool
) -> None:
    stale_socket(api_path)
    with pytest.raises(DoubleStartError) as refused:
        await make_double(profile=profile)
    assert refused.value.chain[1:] == [
        "Error creation API server's socket",
        "Address already in use (os error 98)",
    ]
    # v52's main() removes the path after any start_vmm result, even this one.
    assert os.path.exists(api_path) == path_left


async def test_held_lock_refuses_a_second_instance(make_double: MakeDouble, api_path: str) -> None:
    await make_double(pid=1)
    with pytest.raises(DoubleStartError) as refused:
        await make_double(pid=2)
    assert refused.value.chain[-1] == (
        f'API socket "{api_path}" is already in use by another running instance'
    )
    _, pong = await call(api_path, "GET", "vmm.ping")
    assert pong["pid"] == 1  # the first instance and its socket are untouched


async def test_stop_clean_unlinks_and_kill_leaves_the_socket(short_dir: Path) -> None:
    clean = CloudHypervisorDouble(str(short_dir / "clean.sock"))
    killed = CloudHypervisorDouble(str(short_dir / "killed.sock"))
    await clean.start()
    await killed.start()
    await clean.stop(clean=True)
    await killed.stop(clean=False)
    assert not (short_dir / "clean.sock").exists()
    assert (short_dir / "killed.sock").exists()
    assert (clean.exit_code, killed.exit_code) == (0, -signal.SIGKILL)


# ---- process mode ------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def double_process(*args: str) -> AsyncIterator[asyncio.subprocess.Process]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "watcher.testing.chdouble", *args, stdout=asyncio.subprocess.PIPE
    )
    try:
        yield process
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_process_mode_control_socket_and_sigterm(short_dir: Path, backends: Backends) -> None:
    api = str(short_dir / "api.sock")
    control_path = str(short_dir / "control.sock")
    async with double_process(
        "--api-socket", api, "--control-socket", control_path, "--eject", "manual"
    ) as process:
        assert process.stdout is not None
        async with asyncio.timeout(DEADLINE):
            assert await read_ready_line(process.stdout) == process.pid
        control = DoubleControl(control_path)
        await control.wait_ready()
        backend = await backends.start("vfs")
        assert (await call(api, "PUT", "vm.add-fs", fs_body("myfs0", backends.path("vfs"))))[
            0
        ] == 200
        assert await control.call({"cmd": "backends"}) == ["myfs0"]
        assert await call(api, "PUT", "vm.remove-device", {"id": "myfs0"}) == (204, None)
        assert "myfs0" in (await control.call({"cmd": "info"}))["device_tree"]
        await control.call({"cmd": "eject", "id": "myfs0"})
        assert await backend.wait() == 0
        requests = await control.call({"cmd": "requests"})
        assert [(r["path"], r["status"]) for r in requests] == [
            ("/api/v1/vm.add-fs", 200),
            ("/api/v1/vm.remove-device", 204),
        ]
        _, pong = await call(api, "GET", "vmm.ping")
        assert pong["pid"] == process.pid
        process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(DEADLINE):
            assert await process.wait() == 0
    assert not os.path.exists(api)


async def test_process_mode_sigkill_leaves_the_socket(short_dir: Path) -> None:
    api = str(short_dir / "api.sock")
    async with double_process("--api-socket", api, "--profile", "v52") as process:
        assert process.stdout is not None
        async with asyncio.timeout(DEADLINE):
            await read_ready_line(process.stdout)
        process.kill()
        await process.wait()
    assert stat.S_ISSOCK(os.stat(api).st_mode)
