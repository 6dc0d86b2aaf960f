"""The CH double's VM: its config, its device tree and the validation CH runs on `vm.add-fs`.

Two structures matter and they disagree on purpose, as in CH (cloud-hypervisor-api.md §4, §5):
- the **config** (`VmConfig`, shown as `vm.info.config`) is what the next boot builds; hot-added
  fs are appended to it, so they survive reboots, and `vm.remove-device` drops them from it at
  once;
- the **device tree** (`vm.info.device_tree`) is what the running Vm has; it exists only while a
  Vm does, and a removed device's two nodes stay in it until the guest ejects the device.

Ids are checked against both: against every id in the config during validation ("Identifier X
is not unique", §3), then against the device tree on hot add ("Invalid identifier as it is not
unique: X"). Everything here is plain data; backend connections live in `chdouble`.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from watcher.testing.chdouble_profiles import Profile
from watcher.testing.chdouble_serde import (
    BOOL,
    PATH,
    STRING,
    U8,
    U16,
    U32,
    U64,
    USIZE,
    Field,
    JsonDocument,
    Path,
)
from watcher.testing.vhost_user import VhostUserFrontend

DEFAULT_MEMORY_SIZE = 512 << 20
VIRTIO_MAX_QUEUE_SIZE = 32768
NUM_DEVICE_IDS = 32
# The double's VM holds, in slots 1-5 of segment 0, what a typical CH VM has there (console,
# disk, net, rng, ...); only console and rng are shown. New devices start at slot 6, as in §2.
FIRST_FREE_SLOT = 6
BUILTIN_DEVICES = (("__console", 1), ("__rng", 2))
# virtio-fs's config space holds a 36-byte tag; `Fs::new` truncates silently (§2).
FS_TAG_BYTES = 36
VIRTIO_BAR_SIZE = 0x80000


class ConfigInvalid(Exception):
    """`VmConfig::validate` failed; `conflict` marks IdentifierNotUnique (409 on HEAD)."""

    def __init__(self, message: str, *, conflict: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.conflict = conflict


class PciSlotUnavailable(Exception):
    """The PCI bus has no slot for the device (pci `PciRootError`, below
    DeviceManager's "Failed to find an available PCI device ID")."""


@dataclass
class FsConfig:
    """One `config.fs` entry (vm_config.rs `FsConfig`)."""

    tag: str
    socket: str
    num_queues: int = 1
    queue_size: int = 1024
    id: str | None = None
    pci_segment: int = 0
    pci_device_id: int | None = None
    iommu: bool = False

    def to_json(self, profile: Profile) -> dict[str, Any]:
        """FsConfig as this release serialises it: key order and `null` handling (§0, §4)."""
        if not profile.fs_pci_common:
            return {
                "tag": self.tag,
                "socket": self.socket,
                "num_queues": self.num_queues,
                "queue_size": self.queue_size,
                "id": self.id,
                "pci_segment": self.pci_segment,
            }
        common: dict[str, Any] = {"id": self.id}
        if self.iommu:
            common["iommu"] = True
        common["pci_segment"] = self.pci_segment
        common["pci_device_id"] = self.pci_device_id
        if profile.omit_none:
            common = {key: value for key, value in common.items() if value is not None}
        return {
            **common,
            "tag": self.tag,
            "socket": self.socket,
            "num_queues": self.num_queues,
            "queue_size": self.queue_size,
        }


def fs_fields(profile: Profile) -> list[Field]:
    """FsConfig's serde fields; from v52 the PCI ones are flattened from PciDeviceCommonConfig."""
    own = [
        Field("tag", STRING),
        Field("socket", PATH),
        Field("num_queues", USIZE, default=1),
        Field("queue_size", U16, default=1024),
    ]
    if not profile.fs_pci_common:
        return [*own, Field("id", STRING, None, option=True), Field("pci_segment", U16, 0)]
    return [
        Field("id", STRING, None, option=True, flattened=True),
        Field("iommu", BOOL, False, flattened=True),
        Field("pci_segment", U16, 0, flattened=True),
        Field("pci_device_id", U8, None, option=True, flattened=True),
        *own,
    ]


def read_fs_config(document: JsonDocument, path: Path, profile: Profile) -> FsConfig:
    """Deserialize an FsConfig (the `vm.add-fs` body, or one `fs` entry of `vm.create`)."""
    values = document.read_struct(path, "FsConfig", fs_fields(profile))
    return FsConfig(
        tag=values["tag"],
        socket=values["socket"],
        num_queues=values["num_queues"],
        queue_size=values["queue_size"],
        id=values["id"],
        pci_segment=values["pci_segment"],
        pci_device_id=values.get("pci_device_id"),
        iommu=bool(values.get("iommu", False)),
    )


def read_remove_device(document: JsonDocument) -> str:
    """The `vm.remove-device` body, `VmRemoveDeviceData { id: String }`."""
    values = document.read_struct((), "VmRemoveDeviceData", [Field("id", STRING)])
    return str(values["id"])


# VmConfig's top-level keys in serialisation order, with what an unset key shows. Sections the
# double does not model are kept as the client sent them.
_VM_CONFIG_DEFAULTS: dict[str, Any] = {
    "cpus": None,
    "memory": None,
    "payload": None,
    "rate_limit_groups": None,
    "disks": None,
    "net": None,
    "rng": {"src": "/dev/urandom", "iommu": False},
    "balloon": None,
    "fs": None,
    "pmem": None,
    "serial": {"file": None, "mode": "Null", "iommu": False, "socket": None},
    "console": {"file": None, "mode": "Tty", "iommu": False, "socket": None},
    "devices": None,
    "user_devices": None,
    "vdpa": None,
    "vsock": None,
    "pvpanic": False,
    "iommu": False,
    "numa": None,
    "watchdog": False,
    "pci_segments": None,
    "platform": None,
    "tpm": None,
    "landlock_enable": False,
    "landlock_rules": None,
}
_CPUS_DEFAULTS: dict[str, Any] = {
    "boot_vcpus": 1,
    "max_vcpus": 1,
    "topology": None,
    "kvm_hyperv": False,
    "max_phys_bits": 46,
    "affinity": None,
    "features": {},
}
_MEMORY_DEFAULTS: dict[str, Any] = {
    "size": DEFAULT_MEMORY_SIZE,
    "mergeable": False,
    "hotplug_method": "Acpi",
    "hotplug_size": None,
    "hotplugged_size": None,
    "shared": False,
    "hugepages": False,
    "hugepage_size": None,
    "prefault": False,
    "zones": None,
    "thp": True,
}
# Devices DeviceManager creates before and after the fs devices at boot, with the prefixes of
# the ids it generates for entries that have none (device_manager.rs `make_virtio_devices`,
# then the VFIO devices). They draw from the same counter as `_fs<N>`.
NAMED_BEFORE_FS = (("disks", "_disk"), ("net", "_net"))
NAMED_AFTER_FS = (
    ("pmem", "_pmem"),
    ("vsock", "_vsock"),
    ("vdpa", "_vdpa"),
    ("devices", "_vfio"),
    ("user_devices", "_vfio_user"),
)
# Device lists whose entries carry an `id` that must be unique together with the fs ids.
_DEVICE_LISTS = ("disks", "net", "pmem", "devices", "user_devices", "vdpa", "rate_limit_groups")


@dataclass
class VmConfig:
    """The live VmConfig: modelled parts typed, the rest kept as sent."""

    cpus: dict[str, Any]
    memory: dict[str, Any]
    fs: list[FsConfig] | None = None
    sections: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def default(cls, *, boot_vcpus: int, memory_shared: bool) -> VmConfig:
        """What the double's `--vm created|running` starts with, as if given on CH's CLI."""
        return cls(
            cpus={"boot_vcpus": boot_vcpus, "max_vcpus": boot_vcpus},
            memory={"size": DEFAULT_MEMORY_SIZE, "shared": memory_shared},
            sections={"payload": {"kernel": "/var/lib/cloud-hypervisor/vmlinux"}},
        )

    @property
    def boot_vcpus(self) -> int:
        return int(self.cpus.get("boot_vcpus", 1))

    def backed_by_shared_memory(self) -> bool:
        """CH's rule for vhost-user: shared or hugepage memory, or only such zones (§2)."""
        if self.memory.get("shared") or self.memory.get("hugepages"):
            return True
        if self.memory.get("size", DEFAULT_MEMORY_SIZE) != 0:
            return False
        zones = self.memory.get("zones") or []
        return all(zone.get("shared") or zone.get("hugepages") for zone in zones)

    def other_device_ids(self) -> Iterator[str]:
        """Ids of the non-fs devices in the config, which fs ids must not repeat."""
        for key in _DEVICE_LISTS:
            for entry in self.sections.get(key) or []:
                if isinstance(entry, dict) and isinstance(entry.get("id"), str):
                    yield entry["id"]
        vsock = self.sections.get("vsock")
        if isinstance(vsock, dict) and isinstance(vsock.get("id"), str):
            yield vsock["id"]

    def remove_device(self, device_id: str) -> bool:
        """`VmConfig::remove_device`: drop every entry with this id; `fs` may become `[]`."""
        removed = False
        if self.fs is not None:
            kept = [entry for entry in self.fs if entry.id != device_id]
            removed = len(kept) != len(self.fs)
            self.fs = kept
        for key in _DEVICE_LISTS:
            entries = self.sections.get(key)
            if isinstance(entries, list):
                kept_entries = [
                    e for e in entries if not (isinstance(e, dict) and e.get("id") == device_id)
                ]
                removed |= len(kept_entries) != len(entries)
                self.sections[key] = kept_entries
        return removed

    def to_json(self, profile: Profile) -> dict[str, Any]:
        """VmConfig as `vm.info` shows it for this release."""
        rendered: dict[str, Any] = {}
        for key, default in _VM_CONFIG_DEFAULTS.items():
            if key == "cpus":
                rendered[key] = {**_CPUS_DEFAULTS, **self.cpus}
            elif key == "memory":
                rendered[key] = {**_MEMORY_DEFAULTS, **self.memory}
            elif key == "fs":
                rendered[key] = (
                    None if self.fs is None else [entry.to_json(profile) for entry in self.fs]
                )
            else:
                rendered[key] = self.sections.get(key, default)
        return _without_none(rendered) if profile.omit_none else rendered


def read_vm_config(document: JsonDocument, profile: Profile) -> VmConfig:
    """Deserialize the `vm.create` body. Like CH, nothing is validated here (§2)."""
    document.read_struct((), "VmConfig", [])
    body: dict[str, Any] = document.at(())
    config = VmConfig(cpus={}, memory={})
    vcpus = U8 if not profile.fs_pci_common else U32
    for key, value in body.items():
        if key == "cpus":
            fields = [Field("boot_vcpus", vcpus), Field("max_vcpus", vcpus)]
            document.read_struct(("cpus",), "CpusConfig", fields)
            config.cpus = dict(value)
        elif key == "memory":
            fields = [
                Field("size", U64),
                Field("shared", BOOL, False),
                Field("hugepages", BOOL, False),
            ]
            document.read_struct(("memory",), "MemoryConfig", fields)
            config.memory = dict(value)
        elif key == "fs":
            config.fs = _read_fs_list(document, value, profile)
        elif key in _VM_CONFIG_DEFAULTS:
            config.sections[key] = value
    if not config.cpus:
        config.cpus = {"boot_vcpus": 1, "max_vcpus": 1}
    if not config.memory:
        config.memory = {"size": DEFAULT_MEMORY_SIZE}
    return config


def _read_fs_list(document: JsonDocument, value: Any, profile: Profile) -> list[FsConfig] | None:
    if value is None:
        return None
    document.expect_list(("fs",))
    return [read_fs_config(document, ("fs", index), profile) for index in range(len(value))]


def _without_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _without_none(item) for key, item in value.items() if item is not None}
    if isinstance(value, list):
        return [_without_none(item) for item in value]
    return value


def validate_fs_addition(config: VmConfig, new: FsConfig, profile: Profile) -> None:
    """`VmConfig::validate` on a clone with `new` appended, for the parts that involve fs.

    The order is CH's (config.rs `validate`, `FsConfig::validate`): shared memory first, then
    per fs entry its own checks followed by its id, so an invalid base config fails too (§2).
    """
    entries = [*(config.fs or []), new]
    if not config.backed_by_shared_memory():
        raise ConfigInvalid("Using vhost-user requires using shared memory or huge pages")
    seen = set(config.other_device_ids())
    for entry in entries:
        _validate_fs_entry(entry, config, profile)
        if entry.id is None:
            continue
        if entry.id.startswith("__"):
            raise ConfigInvalid(f"Identifier {entry.id} is not valid")
        if entry.id in seen:
            raise ConfigInvalid(f"Identifier {entry.id} is not unique", conflict=True)
        seen.add(entry.id)


def _validate_fs_entry(entry: FsConfig, config: VmConfig, profile: Profile) -> None:
    if entry.num_queues > config.boot_vcpus:
        raise ConfigInvalid(profile.too_many_queues(entry.num_queues, config.boot_vcpus))
    power_of_two = entry.queue_size > 0 and not entry.queue_size & (entry.queue_size - 1)
    if profile.checks_queue_size and not power_of_two:
        raise ConfigInvalid(
            f"Queue size must be a power of 2 no greater than {VIRTIO_MAX_QUEUE_SIZE}: "
            f"{entry.queue_size}"
        )
    if profile.fs_pci_common and entry.iommu:
        raise ConfigInvalid("Device does not support being placed behind IOMMU")
    platform = config.sections.get("platform")
    segments: int | None = None
    if isinstance(platform, dict):
        segments = int(platform.get("num_pci_segments", 1))
    elif profile.checks_default_pci_segments:
        segments = 1
    if segments is not None and entry.pci_segment >= segments:
        raise ConfigInvalid(f"Invalid PCI segment id: {entry.pci_segment}")
    if entry.pci_device_id is not None:
        if entry.pci_device_id >= NUM_DEVICE_IDS:
            raise ConfigInvalid(
                f"Given PCI device ID ({entry.pci_device_id}) is out of the supported range "
                f"of 0..{NUM_DEVICE_IDS}"
            )
        if entry.pci_device_id == 0 and entry.pci_segment == 0:
            raise ConfigInvalid("Given PCI device ID (0) is reserved")


@dataclass
class DeviceNode:
    """One `device_tree` entry (device_tree.rs `DeviceNode`)."""

    id: str
    resources: list[dict[str, Any]] = field(default_factory=list)
    parent: str | None = None
    children: list[str] = field(default_factory=list)
    pci_bdf: str | None = None

    def to_json(self, profile: Profile) -> dict[str, Any]:
        node: dict[str, Any] = {
            "id": self.id,
            "resources": self.resources,
            "parent": self.parent,
            "children": self.children,
            "pci_bdf": self.pci_bdf,
        }
        return _without_none(node) if profile.omit_none else node


@dataclass
class FsDevice:
    """A virtio-fs device of the running Vm, with the vhost-user connection it holds."""

    id: str
    socket: str
    guest_tag: bytes
    bdf: str
    segment: int
    slot: int
    frontend: VhostUserFrontend | None = None
    watcher: asyncio.Task[None] | None = None
    # v52+: the backend died and could not be reconnected; the device stays, dead (§7).
    needs_reset: bool = False
    # `vm.remove-device` was answered; the nodes stay until the guest ejects (§5).
    removal_pending: bool = False
    eject_task: asyncio.Task[None] | None = None


@dataclass
class RunningVm:
    """CH's `Vm` plus its DeviceManager: exists between a boot and the next shutdown."""

    state: Literal["Running", "Paused"]
    boot_ids: set[str]
    nodes: dict[str, DeviceNode] = field(default_factory=dict)
    devices: dict[str, FsDevice] = field(default_factory=dict)
    used_slots: set[tuple[int, int]] = field(default_factory=set)
    device_id_counter: int = 0

    @classmethod
    def new(cls, config: VmConfig) -> RunningVm:
        """An empty Vm with the built-in devices; fs devices are attached by the boot."""
        boot_ids = set(config.other_device_ids())
        boot_ids.update(entry.id for entry in config.fs or [] if entry.id is not None)
        vm = cls(state="Running", boot_ids=boot_ids)
        vm.used_slots.update((0, slot) for slot in range(FIRST_FREE_SLOT))
        for device_id, slot in BUILTIN_DEVICES:
            vm._add_pci_nodes(device_id, 0, slot)
        return vm

    def next_device_name(self, prefix: str) -> str:
        """DeviceManager's generated ids: one counter for every device kind (§2)."""
        while True:
            name = f"{prefix}{self.device_id_counter}"
            self.device_id_counter += 1
            if name not in self.boot_ids and name not in self.nodes:
                return name

    def name_devices(self, config: VmConfig, kinds: tuple[tuple[str, str], ...]) -> None:
        """Give unnamed non-fs devices of the config their generated ids, as a boot does."""
        for key, prefix in kinds:
            value = config.sections.get(key)
            entries = [value] if isinstance(value, dict) else value or []
            for entry in entries:
                if isinstance(entry, dict) and entry.get("id") is None:
                    entry["id"] = self.next_device_name(prefix)

    def attach_fs(self, entry: FsConfig, frontend: VhostUserFrontend) -> FsDevice:
        """Place a connected fs device on the PCI bus: a slot, a BDF and its two tree nodes.

        CH allocates the slot after the vhost-user connect, so a taken `pci_device_id` fails
        the add with the backend already connected, and then dropped (PciSlotUnavailable).
        """
        assert entry.id is not None
        slot = self._free_slot(entry.pci_segment, entry.pci_device_id)
        bdf = self._add_pci_nodes(entry.id, entry.pci_segment, slot)
        device = FsDevice(
            id=entry.id,
            socket=entry.socket,
            guest_tag=entry.tag.encode()[:FS_TAG_BYTES],
            bdf=bdf,
            segment=entry.pci_segment,
            slot=slot,
            frontend=frontend,
        )
        self.devices[entry.id] = device
        return device

    def device_for_node(self, node_id: str) -> FsDevice | None:
        """The fs device a tree node belongs to (its own node or its `_virtio-pci-` parent)."""
        if node_id in self.devices:
            return self.devices[node_id]
        for device in self.devices.values():
            if node_id == pci_node_id(device.id):
                return device
        return None

    def detach(self, device: FsDevice) -> None:
        """The guest ejected the device: both nodes go and the slot is free again (§5)."""
        self.nodes.pop(device.id, None)
        self.nodes.pop(pci_node_id(device.id), None)
        self.used_slots.discard((device.segment, device.slot))
        self.devices.pop(device.id, None)

    def tree_json(self, profile: Profile) -> dict[str, Any]:
        return {node_id: node.to_json(profile) for node_id, node in self.nodes.items()}

    def _free_slot(self, segment: int, wanted: int | None) -> int:
        """`PciBus::allocate_device_id`: the requested slot, or the lowest free one."""
        if wanted is not None:
            if (segment, wanted) in self.used_slots:
                raise PciSlotUnavailable(f"Valid PCI device identifier but already used: {wanted}")
            slot = wanted
        else:
            free = [s for s in range(1, NUM_DEVICE_IDS) if (segment, s) not in self.used_slots]
            if not free:
                raise PciSlotUnavailable("Could not find an available device slot on the PCI bus")
            slot = free[0]
        self.used_slots.add((segment, slot))
        return slot

    def _add_pci_nodes(self, device_id: str, segment: int, slot: int) -> str:
        bdf = f"{segment:04x}:00:{slot:02x}.0"
        pci_id = pci_node_id(device_id)
        bar = {
            "PciBar": {
                "index": 0,
                "base": (1 << 46) - (NUM_DEVICE_IDS - slot) * VIRTIO_BAR_SIZE,
                "size": VIRTIO_BAR_SIZE,
                "type_": "Mmio64",
                "prefetchable": False,
            }
        }
        self.nodes[device_id] = DeviceNode(id=device_id, parent=pci_id)
        self.nodes[pci_id] = DeviceNode(
            id=pci_id, resources=[bar], children=[device_id], pci_bdf=bdf
        )
        return bdf


def pci_node_id(device_id: str) -> str:
    """The name of a virtio device's PCI transport node (device_manager.rs)."""
    return f"_virtio-pci-{device_id}"


def vm_info(config: VmConfig, vm: RunningVm | None, profile: Profile) -> dict[str, Any]:
    """`VmInfoResponse`: `device_tree` only while a Vm exists; `state` Created otherwise (§4)."""
    info: dict[str, Any] = {
        "config": config.to_json(profile),
        "state": "Created" if vm is None else vm.state,
        "memory_actual_size": int(config.memory.get("size", DEFAULT_MEMORY_SIZE)),
        "device_tree": None if vm is None else vm.tree_json(profile),
    }
    if profile.omit_none and vm is None:
        del info["device_tree"]
    return info


def json_bytes(value: Any) -> bytes:
    """serde_json's compact output."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


def clone_fs(entries: list[FsConfig] | None) -> list[FsConfig] | None:
    """A deep copy of `config.fs`, as a boot works on."""
    return None if entries is None else [replace(entry) for entry in entries]
