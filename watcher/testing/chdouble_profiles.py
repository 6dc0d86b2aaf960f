"""What differs between Cloud Hypervisor releases, as one table the CH double reads.

A daemon has to cope with every CH it meets, and the differences are not cosmetic
(cloud-hypervisor-api.md §0): the status for "VM not created" moved from 500 to 404 in v53,
duplicate ids became 409 only after v53, `vm.info` stopped printing `null` in v53, v53 started
replacing a stale API socket under a `.lock` file while v52 removes its socket on every exit, HEAD
stopped retrying vhost-user connects that fail with anything but ENOENT/ECONNREFUSED/EINTR, and a
dead backend took the whole VMM down before v52. Each row below names one such behaviour; the
double never compares version strings, it asks its profile.

Facts not in the reference that shaped a row were read in the CH sources at the tags named in
the reference's "Versions covered"; the field comments say where.
"""

from __future__ import annotations

import enum
import errno
import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Literal

ProfileName = Literal["v47", "v52", "v53", "head"]
PROFILE_NAMES: tuple[ProfileName, ...] = ("v47", "v52", "v53", "head")

MICRO_HTTP_PAYLOAD_LIMIT = 51_200
HEAD_PAYLOAD_LIMIT = 4 << 20


class ErrorKind(enum.Enum):
    """How CH's `api_error_status_code` classifies the root `VmError` of a failed API call (§3)."""

    NOT_CREATED = "VmNotCreated / VmMissingConfig"
    UNKNOWN_DEVICE = "NoDeviceToRemove / UnknownDeviceId"
    ID_CONFLICT = "ConfigValidation(IdentifierNotUnique)"
    INVALID_CONFIG = "ConfigValidation(other)"
    INTERNAL = "everything else"


def _too_many_queues_v47(queues: int, vcpus: int) -> str:
    return "Number of vCPUs is insufficient for number of queues"


def _too_many_queues(queues: int, vcpus: int) -> str:
    return f"Queue count ({queues}) must not exceed boot vCPUs ({vcpus})"


@dataclass(frozen=True)
class Profile:
    """One CH release as the API socket shows it."""

    name: ProfileName
    build_version: str
    version: str
    # Statuses per ErrorKind (§3 "Status mapping"); INTERNAL is always 500.
    not_created_status: int
    unknown_device_status: int
    id_conflict_status: int
    invalid_config_status: int
    body_limit: int
    # v53 put `skip_serializing_none` on VmConfig, FsConfig's PCI fields and DeviceNode (§0, §4).
    omit_none: bool
    # v52 flattened `PciDeviceCommonConfig` into FsConfig: new key order, `iommu` and
    # `pci_device_id` exist, and serde reports field errors at the end of the object.
    fs_pci_common: bool
    # `validate_queue_size` exists from v53 (§3 table, "bad queue size").
    checks_queue_size: bool
    # v53 checks `pci_segment` against a default of one segment when no `platform` is given;
    # v47/v52 check it only when `platform` is present (config.rs `PciDeviceCommonConfig`).
    checks_default_pci_segments: bool
    too_many_queues: Callable[[int, int], str]
    # v53+: OFD lock on `<path>.lock`, then unlink whatever sits at the path (§6).
    api_socket_lock: bool
    # v52's main() removes the socket path after start_vmm returns, Ok or Err, which includes
    # the EADDRINUSE start failure against somebody else's socket (v52 main.rs:893-897).
    unlink_on_error_exit: bool
    # None: every connect error is retried for the whole window (≤ v53, §7).
    retry_errnos: frozenset[int] | None
    # HEAD also retries a handshake that loses the transport (`is_transport_lost`).
    retries_lost_handshake: bool
    # HEAD reports exhausting the window as its own error; v52/v53 chain the last io::Error;
    # v47-v51's `VhostUserConnect` had no `#[source]` (§3 table).
    timeout_has_own_error: bool
    connect_error_has_source: bool
    # ≤ v51: a backend that cannot be reconnected writes exit_evt, the VMM shuts down (§7).
    backend_loss_exits_vmm: bool
    # v53+: vm.boot on an existing Vm is "VM is already created"; before, Vm::boot ran a state
    # transition (resume from Paused, error from Running) (§2).
    boot_rejects_existing_vm: bool
    # v52+ `make_virtio_fs_devices` does `config.fs.take()` and returns early on error, so a
    # boot or reboot that fails on an fs backend leaves `config.fs` empty (None); v47 cloned it.
    failed_boot_drops_fs: bool

    def status(self, kind: ErrorKind) -> int:
        """The HTTP status this release sends for an API error of `kind`."""
        return {
            ErrorKind.NOT_CREATED: self.not_created_status,
            ErrorKind.UNKNOWN_DEVICE: self.unknown_device_status,
            ErrorKind.ID_CONFLICT: self.id_conflict_status,
            ErrorKind.INVALID_CONFIG: self.invalid_config_status,
            ErrorKind.INTERNAL: 500,
        }[kind]

    def retries(self, error: OSError) -> bool:
        """Whether CH's 100 ms connect loop tries again after this connect error (§7)."""
        return self.retry_errnos is None or error.errno in self.retry_errnos

    def connect_failure(self, error: OSError, *, window_over: bool) -> list[str]:
        """The chain tail below "Cannot create virtio-fs device" for a failed backend connect."""
        if window_over and self.timeout_has_own_error and self.retries(error):
            return ["Timed out waiting for vhost-user connection"]
        if not self.connect_error_has_source:
            return ["Connection to socket failed"]
        return [
            "Connection to socket failed",
            f"vhost-user: can't connect to peer: {io_error(error)}",
        ]


def io_error(error: OSError) -> str:
    """Rust's `Display` for an `io::Error` built from an errno."""
    code = error.errno if error.errno is not None else errno.EIO
    return f"{os.strerror(code)} (os error {code})"


_V52 = Profile(
    name="v52",
    build_version="v52.0",
    version="52.0.0",
    not_created_status=500,
    unknown_device_status=500,
    id_conflict_status=500,
    invalid_config_status=500,
    body_limit=MICRO_HTTP_PAYLOAD_LIMIT,
    omit_none=False,
    fs_pci_common=True,
    checks_queue_size=False,
    checks_default_pci_segments=False,
    too_many_queues=_too_many_queues,
    api_socket_lock=False,
    unlink_on_error_exit=True,
    retry_errnos=None,
    retries_lost_handshake=False,
    timeout_has_own_error=False,
    connect_error_has_source=True,
    backend_loss_exits_vmm=False,
    boot_rejects_existing_vm=False,
    failed_boot_drops_fs=True,
)
_V53 = replace(
    _V52,
    name="v53",
    build_version="v53.0",
    version="53.0.0",
    not_created_status=404,
    omit_none=True,
    checks_queue_size=True,
    checks_default_pci_segments=True,
    api_socket_lock=True,
    unlink_on_error_exit=False,
    boot_rejects_existing_vm=True,
)
PROFILES: dict[ProfileName, Profile] = {
    "v47": replace(
        _V52,
        name="v47",
        build_version="v47.0",
        version="47.0.0",
        fs_pci_common=False,
        too_many_queues=_too_many_queues_v47,
        unlink_on_error_exit=False,
        connect_error_has_source=False,
        backend_loss_exits_vmm=True,
        failed_boot_drops_fs=False,
    ),
    "v52": _V52,
    "v53": _V53,
    "head": replace(
        _V53,
        name="head",
        build_version="v53.0-246-gae44c2971",
        version="54.0.0",
        unknown_device_status=404,
        id_conflict_status=409,
        invalid_config_status=400,
        body_limit=HEAD_PAYLOAD_LIMIT,
        retry_errnos=frozenset({errno.ENOENT, errno.ECONNREFUSED, errno.EINTR}),
        retries_lost_handshake=True,
        timeout_has_own_error=True,
    ),
}
