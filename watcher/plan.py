"""Desired shares + what CH reports → what to do. Pure: no I/O, no clock.

Theory of operation (level-based, like controller-runtime's reconcile): the
input is always a fresh `vm.info`, never an event, so a missed, duplicated or
reordered event cannot cause a wrong action. Devices are matched by id only
(prefix + tag): ids are the one field CH guarantees unique (§2), CLI `--fs`
devices without ids are never ours, and Cocoon derives the same ids.

Rules, one per share or device, in config order:
- id in config.fs with the same socket/num_queues/queue_size → `Satisfied`
  (hot-added devices survive reboots inside one CH process, §6, so re-adding
  would only produce a duplicate-id error);
- id in config.fs with other settings → `Replace` (remove, wait for the guest's
  eject, add again);
- id absent from config.fs but still in device_tree → `WaitEject`: a removal is
  pending and CH refuses the id until the guest ejects (§5);
- another device already uses the share's socket → `WaitSocket` if that
  device is ours and on its way out (pruned, or replaced onto another
  socket), or was removed and awaits the guest's eject (it keeps its
  vhost-user connection until then, §5), else `Conflict`: CH never checks
  this, and a second connect to a virtiofsd that serves one frontend stalls
  or hangs CH's API (§7); a device of someone else with the same tag is a
  `Conflict` too (the guest could not tell the two apart when mounting by tag);
- id absent and the backend socket not ready → `WaitBackend`: add-fs would
  block the whole CH API for 60 s and then fail (§7);
- otherwise → `Attach`.
Devices carrying our prefix that the config no longer lists → `Detach` when
pruning is on, else `Unmanaged` (left alone, reported once).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

from .chclient import FsDevice, VmInfo
from .config import Share


@dataclass(frozen=True)
class Satisfied:
    share: Share


@dataclass(frozen=True)
class Attach:
    share: Share


@dataclass(frozen=True)
class Replace:
    share: Share
    current: FsDevice


@dataclass(frozen=True)
class WaitEject:
    share: Share


@dataclass(frozen=True)
class WaitBackend:
    share: Share


@dataclass(frozen=True)
class WaitSocket:
    share: Share
    holder: str


@dataclass(frozen=True)
class Conflict:
    share: Share
    reason: str
    fix: str


@dataclass(frozen=True)
class Detach:
    device_id: str


@dataclass(frozen=True)
class Unmanaged:
    device_id: str


Step = (
    Satisfied
    | Attach
    | Replace
    | WaitEject
    | WaitSocket
    | Conflict
    | WaitBackend
    | Detach
    | Unmanaged
)


def plan_vm(
    desired: Sequence[Share],
    observed: VmInfo,
    *,
    device_id_prefix: str,
    prune: bool,
    present_backends: Collection[str],
    ejecting: Mapping[str, str],
) -> tuple[Step, ...]:
    """Decide one step per desired share, then one per stray device of ours.

    `ejecting` maps removed devices still in device_tree to the socket they
    used: vm.info no longer says it (config.fs lost the entry), so the caller
    remembers it from earlier looks."""
    by_id = {device.id: device for device in observed.fs if device.id is not None}
    wanted = {share.device_id: share for share in desired}
    steps: list[Step] = []
    for share in desired:
        current = by_id.get(share.device_id)
        if current is not None:
            steps.append(Satisfied(share) if _matches(share, current) else Replace(share, current))
        elif share.device_id in observed.device_tree_ids:
            steps.append(WaitEject(share))
        elif (holder := _ejecting_holder(share, observed, ejecting)) is not None:
            steps.append(WaitSocket(share, holder))
        elif (clash := _clash(share, observed, wanted, device_id_prefix, prune)) is not None:
            steps.append(clash)
        elif share.socket not in present_backends:
            steps.append(WaitBackend(share))
        else:
            steps.append(Attach(share))
    for device_id in by_id:
        if device_id in wanted or not _is_ours(device_id, device_id_prefix):
            continue
        steps.append(Detach(device_id) if prune else Unmanaged(device_id))
    return tuple(steps)


def _ejecting_holder(share: Share, observed: VmInfo, ejecting: Mapping[str, str]) -> str | None:
    """A removed device, not yet ejected, still connected to the share's socket."""
    live = {device.id for device in observed.fs}
    for device_id, socket in ejecting.items():
        if socket == share.socket and device_id in observed.device_tree_ids - live:
            return device_id
    return None


def _clash(
    share: Share,
    observed: VmInfo,
    wanted: dict[str, Share],
    prefix: str,
    prune: bool,
) -> WaitSocket | Conflict | None:
    """Another device holding the share's socket or tag, and whether that will pass."""
    for device in observed.fs:
        holder = device.id or f"(unnamed, tag {device.tag})"
        if device.socket == share.socket:
            leaving = (
                device.id is not None
                and _is_ours(device.id, prefix)
                and (
                    (device.id not in wanted and prune)
                    or (device.id in wanted and wanted[device.id].socket != device.socket)
                )
            )
            if leaving:
                return WaitSocket(share, holder)
            return Conflict(
                share,
                f"socket {share.socket} is already used by device {holder}",
                f"remove device {holder} from the VM, or give this share its own virtiofsd"
                " and socket",
            )
        if device.tag == share.tag and not (device.id and _is_ours(device.id, prefix)):
            return Conflict(
                share,
                f"tag {share.tag} is already used by device {holder}",
                f"remove device {holder} from the VM, or rename the share",
            )
    return None


def _matches(share: Share, device: FsDevice) -> bool:
    return (device.socket, device.num_queues, device.queue_size) == (
        share.socket,
        share.num_queues,
        share.queue_size,
    )


def _is_ours(device_id: str, prefix: str) -> bool:
    """An empty prefix claims nothing: we never prune devices we cannot tell apart."""
    return bool(prefix) and device_id.startswith(prefix)
