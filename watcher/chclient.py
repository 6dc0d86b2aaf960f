"""The four Cloud Hypervisor API calls the daemon makes, with CH's answers decoded.

Timeouts follow cloud-hypervisor-api.md §9: the API is single-threaded and a
backend connect inside add-fs can hold it for 60 s, so add-fs gets 90 s and a
timeout there means "outcome unknown" (the caller re-reads vm.info), while
ping/info get a short deadline and a timeout is just a retryable failure.

Everything CH returns is parsed defensively: a peer that answers with the
wrong shape raises `BadAnswer`, never a KeyError or TypeError in the daemon.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from contextlib import AbstractAsyncContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

from . import unixhttp
from .answers import Answer, classify, is_retryable
from .config import Share

PING_TIMEOUT = 5.0
INFO_TIMEOUT = 10.0
ADD_FS_TIMEOUT = 90.0
"""Longer than CH's 60 s vhost-user connect retry (§7), so a slow backend is not a timeout."""
REMOVE_TIMEOUT = 10.0

_API = "/api/v1/"


class ChError(Exception):
    """Base of every failure that came from the peer's answer."""


class NotCloudHypervisor(ChError):
    """The socket answers, but not as CH: e.g. a Firecracker API socket (vmm.ping 404)."""


class ApiError(ChError):
    """CH answered with an error status; `answer` says what it means."""

    def __init__(self, call: str, answer: Answer) -> None:
        super().__init__(f"{call}: HTTP {answer.status}: {answer.reason}")
        self.call = call
        self.answer = answer


class BadAnswer(ChError):
    """A success status whose body is not what CH sends."""


@dataclass(frozen=True)
class VmmIdentity:
    """Who answers on the socket; a new pid is a new CH process (§6)."""

    version: str
    pid: int | None


@dataclass(frozen=True)
class FsDevice:
    """One entry of vm.info's config.fs. Cold-added entries have no id until boot (§4)."""

    id: str | None
    tag: str
    socket: str
    num_queues: int
    queue_size: int


@dataclass(frozen=True)
class VmInfo:
    state: str
    fs: tuple[FsDevice, ...]
    device_tree_ids: frozenset[str]
    """Ids in device_tree. An id removed from config.fs stays here until the guest ejects (§5)."""

    @property
    def booted(self) -> bool:
        return self.state in ("Running", "Paused")


@dataclass(frozen=True)
class AddFsResult:
    hot: bool
    """True: plugged into a running VM (200).
    False: written to the config of a VM that is not booted (204)."""
    bdf: str | None


def add_fs_body(share: Share) -> dict[str, Any]:
    """The FsConfig we send. The id is always explicit: CH's generated `_fs<N>` ids
    come from a counter shared by all devices and cannot be matched later (§2)."""
    return {
        "tag": share.tag,
        "socket": share.socket,
        "num_queues": share.num_queues,
        "queue_size": share.queue_size,
        "id": share.device_id,
    }


class ChClient:
    """Calls on one VM's API socket. Callers serialise calls per VM (CH does anyway)."""

    def __init__(
        self,
        api_socket: str,
        limiter: AbstractAsyncContextManager[Any] | None = None,
    ) -> None:
        self.api_socket = api_socket
        self._limiter: AbstractAsyncContextManager[Any] = limiter or nullcontext()

    async def _call(
        self,
        method: str,
        name: str,
        body: Mapping[str, Any] | None,
        timeout: float,
        *,
        limited: bool = True,
    ) -> unixhttp.HttpResponse:
        payload = None if body is None else json.dumps(body).encode()
        async with self._limiter if limited else nullcontext():
            return await unixhttp.request(
                self.api_socket, method, _API + name, payload, timeout=timeout
            )

    async def ping(self) -> VmmIdentity:
        response = await self._call("GET", "vmm.ping", None, PING_TIMEOUT)
        if response.status != 200:
            answer = classify(response.status, response.body)
            if is_retryable(answer):
                # CH, but not free to serve us: micro_http's 503 when ten connections
                # are open (§9), or a passing 5xx. A 404 or a 400 is another API.
                raise ApiError("vmm.ping", answer)
            raise NotCloudHypervisor(
                f"vmm.ping answered HTTP {response.status}: not a Cloud Hypervisor API socket"
            )
        data = _json_object(response.body, "vmm.ping")
        version = data.get("version")
        if not isinstance(version, str):
            raise NotCloudHypervisor("vmm.ping answer has no version: not Cloud Hypervisor")
        pid = data.get("pid")
        return VmmIdentity(version=version, pid=pid if isinstance(pid, int) else None)

    async def info(self) -> VmInfo:
        response = await self._call("GET", "vm.info", None, INFO_TIMEOUT)
        if response.status != 200:
            raise ApiError("vm.info", classify(response.status, response.body))
        return parse_vm_info(_json_object(response.body, "vm.info"))

    async def add_fs(self, share: Share) -> AddFsResult:
        # Not limited: an add-fs can legitimately take 60 s (§7), and VMs whose CH is
        # stuck that long must not use up the slots of healthy ones.
        response = await self._call(
            "PUT", "vm.add-fs", add_fs_body(share), ADD_FS_TIMEOUT, limited=False
        )
        if response.status == 204:
            return AddFsResult(hot=False, bdf=None)
        if response.status == 200:
            data = _json_object(response.body, "vm.add-fs")
            bdf = data.get("bdf")
            return AddFsResult(hot=True, bdf=bdf if isinstance(bdf, str) else None)
        raise ApiError("vm.add-fs", classify(response.status, response.body))

    async def remove_device(self, device_id: str) -> None:
        response = await self._call("PUT", "vm.remove-device", {"id": device_id}, REMOVE_TIMEOUT)
        if response.status not in (200, 204):
            raise ApiError("vm.remove-device", classify(response.status, response.body))


def _json_object(body: bytes, call: str) -> dict[str, Any]:
    try:
        data = json.loads(body)
    except ValueError as exc:
        raise BadAnswer(f"{call} answer is not JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise BadAnswer(f"{call} answer is not a JSON object")
    return data


def parse_vm_info(data: Mapping[str, Any]) -> VmInfo:
    """Decode vm.info, tolerating every release's shape: `fs` absent (v53+), `null`
    (<= v52) or a list; `device_tree` absent/`null` while the VM is not booted (§4)."""
    state = data.get("state")
    if not isinstance(state, str):
        raise BadAnswer("vm.info answer has no state")
    config = data.get("config")
    if not isinstance(config, dict):
        raise BadAnswer("vm.info answer has no config object")
    raw_fs = config.get("fs") or []
    if not isinstance(raw_fs, list):
        raise BadAnswer("vm.info config.fs is not a list")
    fs = tuple(_fs_device(entry) for entry in raw_fs)
    tree = data.get("device_tree") or {}
    if not isinstance(tree, dict):
        raise BadAnswer("vm.info device_tree is not an object")
    return VmInfo(state=state, fs=fs, device_tree_ids=frozenset(str(key) for key in tree))


def _fs_device(entry: object) -> FsDevice:
    if not isinstance(entry, dict):
        raise BadAnswer("vm.info config.fs entry is not an object")
    device_id = entry.get("id")
    tag, socket = entry.get("tag"), entry.get("socket")
    num_queues, queue_size = entry.get("num_queues", 1), entry.get("queue_size", 1024)
    if not (isinstance(tag, str) and isinstance(socket, str)):
        raise BadAnswer("vm.info config.fs entry lacks tag or socket")
    if not (isinstance(num_queues, int) and isinstance(queue_size, int)):
        raise BadAnswer("vm.info config.fs entry has non-integer queue settings")
    return FsDevice(
        id=device_id if isinstance(device_id, str) else None,
        tag=tag,
        socket=socket,
        num_queues=num_queues,
        queue_size=queue_size,
    )
