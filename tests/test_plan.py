"""The pure planning function: desired shares + vm.info → steps, no sockets."""

from __future__ import annotations

from watcher import plan
from watcher.chclient import FsDevice, VmInfo
from watcher.config import Share

PREFIX = "cocoon-fs-"


def share(tag: str, socket: str | None = None, **overrides: int) -> Share:
    return Share(
        vm="web01",
        tag=tag,
        socket=socket or f"/run/vfs/{tag}.sock",
        num_queues=overrides.get("num_queues", 1),
        queue_size=overrides.get("queue_size", 1024),
        device_id=PREFIX + tag,
    )


def device(s: Share, **changes: object) -> FsDevice:
    fields: dict[str, object] = {
        "id": s.device_id,
        "tag": s.tag,
        "socket": s.socket,
        "num_queues": s.num_queues,
        "queue_size": s.queue_size,
    }
    fields.update(changes)
    return FsDevice(**fields)  # type: ignore[arg-type]


def info(*devices: FsDevice, tree: frozenset[str] = frozenset()) -> VmInfo:
    ids = frozenset(d.id for d in devices if d.id) | tree
    return VmInfo(state="Running", fs=devices, device_tree_ids=ids)


def steps(
    desired: list[Share],
    observed: VmInfo,
    *,
    prune: bool = False,
    present: set[str] | None = None,
    ejecting: dict[str, str] | None = None,
) -> tuple[plan.Step, ...]:
    return plan.plan_vm(
        desired,
        observed,
        device_id_prefix=PREFIX,
        prune=prune,
        present_backends=present if present is not None else {s.socket for s in desired},
        ejecting=ejecting or {},
    )


def test_missing_share_with_backend_is_attached() -> None:
    data = share("data")
    assert steps([data], info()) == (plan.Attach(data),)


def test_present_share_is_satisfied_not_added_again() -> None:
    data = share("data")
    assert steps([data], info(device(data))) == (plan.Satisfied(data),)


def test_missing_backend_socket_waits_instead_of_attaching() -> None:
    data = share("data")
    assert steps([data], info(), present=set()) == (plan.WaitBackend(data),)


def test_id_still_in_device_tree_waits_for_eject() -> None:
    data = share("data")
    observed = info(tree=frozenset({data.device_id, "_virtio-pci-" + data.device_id}))
    assert steps([data], observed) == (plan.WaitEject(data),)


def test_changed_settings_are_replaced() -> None:
    data = share("data", queue_size=512)
    current = device(data, queue_size=1024)
    assert steps([data], info(current)) == (plan.Replace(data, current),)
    moved = device(data, socket="/run/old.sock")
    assert steps([data], info(moved)) == (plan.Replace(data, moved),)
    fewer_queues = device(data, num_queues=2)
    assert steps([data], info(fewer_queues)) == (plan.Replace(data, fewer_queues),)


def test_stray_device_of_ours_is_unmanaged_without_prune_and_detached_with_it() -> None:
    gone = device(share("old"))
    assert steps([], info(gone)) == (plan.Unmanaged(gone.id or ""),)
    assert steps([], info(gone), prune=True) == (plan.Detach(gone.id or ""),)


def test_devices_without_our_prefix_are_never_touched() -> None:
    foreign = FsDevice(id="_fs3", tag="x", socket="/s", num_queues=1, queue_size=1024)
    cli = FsDevice(id=None, tag="y", socket="/t", num_queues=1, queue_size=1024)
    assert steps([], info(foreign, cli), prune=True) == ()


def test_empty_prefix_claims_no_device() -> None:
    stray = FsDevice(id="data", tag="data", socket="/s", num_queues=1, queue_size=1024)
    result = plan.plan_vm(
        [], info(stray), device_id_prefix="", prune=True, present_backends=set(), ejecting={}
    )
    assert result == ()


def test_mixed_vm_gets_one_step_per_share_in_config_order() -> None:
    a, b, c = share("a"), share("b"), share("c")
    result = steps([a, b, c], info(device(b)), present={a.socket, b.socket})
    assert result == (plan.Attach(a), plan.Satisfied(b), plan.WaitBackend(c))


def test_socket_held_by_a_foreign_device_is_a_conflict_not_an_attach() -> None:
    data = share("data")
    foreign = FsDevice(id="myfs", tag="other", socket=data.socket, num_queues=1, queue_size=1024)
    (step,) = steps([data], info(foreign))
    assert isinstance(step, plan.Conflict)
    assert step.reason == f"socket {data.socket} is already used by device myfs"


def test_socket_held_by_our_device_on_its_way_out_waits() -> None:
    renamed = share("data2", socket="/run/vfs/data.sock")  # tag renamed, same virtiofsd
    old = device(share("data"))
    assert steps([renamed], info(old), prune=True) == (
        plan.WaitSocket(renamed, "cocoon-fs-data"),
        plan.Detach("cocoon-fs-data"),
    )
    (step, _) = steps([renamed], info(old), prune=False)
    assert isinstance(step, plan.Conflict)  # without prune the old device stays: never free


def test_socket_of_a_device_being_replaced_onto_another_socket_waits() -> None:
    a = share("a", socket="/run/vfs/new.sock")
    b = share("b", socket="/run/vfs/a.sock")  # takes the socket a is leaving
    current_a = device(share("a"))
    assert steps([a, b], info(current_a)) == (
        plan.Replace(a, current_a),
        plan.WaitSocket(b, "cocoon-fs-a"),
    )


def test_same_tag_on_a_foreign_device_is_a_conflict() -> None:
    data = share("data")
    cli = FsDevice(id=None, tag="data", socket="/elsewhere.sock", num_queues=1, queue_size=1024)
    (step,) = steps([data], info(cli))
    assert isinstance(step, plan.Conflict)
    assert step.reason == "tag data is already used by device (unnamed, tag data)"


def test_share_waits_for_a_removed_device_still_connected_to_its_socket() -> None:
    """A renamed share on the same socket: the old device was pruned, but until the
    guest ejects it CH keeps its vhost-user connection, and a second connect to a
    one-connection virtiofsd would stall CH's API (§5, §7)."""
    renamed = share("docs", socket="/run/vfs/data.sock")
    old_id = PREFIX + "data"
    observed = info(tree=frozenset({old_id}))
    assert steps([renamed], observed, ejecting={old_id: renamed.socket}) == (
        plan.WaitSocket(renamed, old_id),
    )


def test_ejected_device_or_other_socket_does_not_hold_the_share() -> None:
    data = share("data")
    gone = {PREFIX + "old": data.socket}
    assert steps([data], info(), ejecting=gone) == (plan.Attach(data),)
    elsewhere = {PREFIX + "old": "/run/vfs/other.sock"}
    pending = info(tree=frozenset({PREFIX + "old"}))
    assert steps([data], pending, ejecting=elsewhere) == (plan.Attach(data),)
