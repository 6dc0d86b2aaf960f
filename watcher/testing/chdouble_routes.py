"""CH's route table and the answers its HTTP side gives before a request reaches the VMM.

Cloud Hypervisor decides a good part of its 400s and 404s in the HTTP thread, from the route
table alone (cloud-hypervisor-api.md §2 "Method mismatches", http/mod.rs, http_endpoint.rs):
- paths match `/api/v1/<name>` exactly (a query string is a 404 `["Not Found"]`);
- `vmm.ping` and `vm.info` take GET, `vm.create` and `vmm.shutdown` take PUT, and any other
  method gets `["Bad Request"]`; `vm.create` without a body gets a 400 with an empty body;
- the other routes are VmActionHandlers: PATCH or DELETE get a 400 with an *empty* body, GET
  on a PUT action (and PUT on the one GET action) gets `["Bad Request"]`, a PUT action that
  needs a body gets `["Bad Request"]` without one, and one that takes none gets it for any body.

Every route CH has is listed, so a client never sees a 404 that CH would not send; the ones the
double does not simulate answer 500 with a chain that says so.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from watcher.testing.chdouble_http import encode_response
from watcher.testing.chdouble_profiles import ErrorKind
from watcher.testing.chdouble_vm import json_bytes

API_ROOT = "/api/v1/"
NOT_SIMULATED = "not simulated by the Cloud Hypervisor test double"

# ApiError texts, the second element of an error chain (vmm/src/api/mod.rs).
ADD_FS = "The fs could not be added to the VM"
REMOVE = "The device could not be removed from the VM"
BOOT = "The VM could not boot"
REBOOT = "The VM could not reboot"


class ApiError(Exception):
    """A failed API action: `chain` follows "Error from API" in the error body (§3)."""

    def __init__(self, kind: ErrorKind, chain: list[str]) -> None:
        super().__init__(": ".join(chain))
        self.kind = kind
        self.chain = chain


@dataclass
class Reply:
    """An answer from CH's handlers; `after` runs once it has been written (vmm.shutdown)."""

    status: int
    body: bytes | None
    after: Callable[[], None] | None = None

    def encode(self) -> bytes:
        return encode_response(self.status, self.body)


def error_reply(status: int, chain: list[str]) -> Reply:
    """CH's `error_response`: the chain as a compact JSON array."""
    return Reply(status, json_bytes(chain))


@dataclass(frozen=True)
class Route:
    """One entry of CH's route table: its handler kind and its ApiError text."""

    kind: Literal["ping", "info", "create", "vmm-shutdown", "action"]
    failure: str
    body: bool = False
    get: bool = False


ROUTES: dict[str, Route] = {
    "vmm.ping": Route("ping", ""),
    "vmm.shutdown": Route("vmm-shutdown", "The VMM could not shutdown"),
    "vm.info": Route("info", "The VM info is not available"),
    "vm.create": Route("create", "The VM could not be created"),
    "vm.boot": Route("action", BOOT),
    "vm.shutdown": Route("action", "The VM could not shutdown"),
    "vm.reboot": Route("action", REBOOT),
    "vm.pause": Route("action", "The VM could not be paused"),
    "vm.resume": Route("action", "The VM could not resume"),
    "vm.delete": Route("action", "The VM could not be deleted"),
    "vm.add-fs": Route("action", ADD_FS, body=True),
    "vm.remove-device": Route("action", REMOVE, body=True),
    "vm.add-disk": Route("action", "The disk could not be added to the VM", body=True),
    "vm.add-net": Route("action", "The network device could not be added to the VM", body=True),
    "vm.add-pmem": Route("action", "The pmem device could not be added to the VM", body=True),
    "vm.add-vsock": Route("action", "The vsock device could not be added to the VM", body=True),
    "vm.add-vdpa": Route("action", "The vDPA device could not be added to the VM", body=True),
    "vm.add-device": Route("action", "The device could not be added to the VM", body=True),
    "vm.add-user-device": Route(
        "action", "The user device could not be added to the VM", body=True
    ),
    "vm.resize": Route("action", "The VM could not be resized", body=True),
    "vm.resize-disk": Route("action", "The disk could not be resized", body=True),
    "vm.resize-zone": Route("action", "The memory zone could not be resized", body=True),
    "vm.snapshot": Route("action", "The VM could not be snapshotted", body=True),
    "vm.restore": Route("action", "The VM could not be restored", body=True),
    "vm.send-migration": Route("action", "Error dispatching the migration worker", body=True),
    "vm.receive-migration": Route("action", "Error receiving migration", body=True),
    "vm.power-button": Route("action", "Error triggering power button"),
    "vm.nmi": Route("action", "Error triggering NMI"),
    "vm.counters": Route("action", "The VM info is not available", get=True),
}
SIMULATED = frozenset(
    {
        "vm.boot",
        "vm.shutdown",
        "vm.reboot",
        "vm.pause",
        "vm.resume",
        "vm.delete",
        "vm.add-fs",
        "vm.remove-device",
    }
)
_ONE_METHOD = {"ping": "GET", "info": "GET", "create": "PUT", "vmm-shutdown": "PUT"}


def route_for(path: str) -> tuple[str, Route] | None:
    """The route a path (already without scheme and host) names, with its short name."""
    if not path.startswith(API_ROOT):
        return None
    name = path[len(API_ROOT) :]
    route = ROUTES.get(name)
    return None if route is None else (name, route)


def refuse_before_vmm(route: Route, method: str, body: bytes | None) -> Reply | None:
    """The 400 the HTTP thread sends for this method and body, or None to go on."""
    if route.kind != "action":
        if method != _ONE_METHOD[route.kind]:
            return error_reply(400, ["Bad Request"])
        if route.kind == "create" and body is None:
            return Reply(400, b"")
        return None
    if method in ("PATCH", "DELETE"):
        return Reply(400, b"")
    if (method == "GET") != route.get:
        return error_reply(400, ["Bad Request"])
    if route.body and body is None:
        return error_reply(400, ["Bad Request"])
    if not route.body and not route.get and body is not None:
        return error_reply(400, ["Bad Request"])
    return None
