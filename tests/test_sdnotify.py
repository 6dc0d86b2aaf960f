"""sd_notify against a real datagram socket standing in for systemd's NOTIFY_SOCKET."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from watcher import sdnotify
from watcher.service import status_line
from watcher.state import ShareState, ShareStatus, SocketState, VmStatus

RECV_DEADLINE = 5.0
"""Backstop only: every datagram is sent before `notify` returns."""


def receive(sock: socket.socket) -> list[str]:
    return sock.recv(4096).decode().split("\n")


@pytest.fixture
def manager(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """A bound datagram socket at a path, announced in NOTIFY_SOCKET."""
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(RECV_DEADLINE)
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        yield sock


def test_fields_arrive_as_one_datagram_in_order(manager: socket.socket) -> None:
    assert sdnotify.notify("READY=1", "STATUS=watching 3 VMs")
    assert receive(manager) == ["READY=1", "STATUS=watching 3 VMs"]


def test_helpers_send_the_protocol_fields(manager: socket.socket) -> None:
    assert sdnotify.ready("watching 2 VMs")
    assert receive(manager) == ["READY=1", "STATUS=watching 2 VMs"]
    assert sdnotify.stopping()
    assert receive(manager) == ["STOPPING=1"]
    assert sdnotify.status("vm1: share data failed\nsee the journal")
    assert receive(manager) == ["STATUS=vm1: share data failed see the journal"]


def test_reloading_carries_the_current_monotonic_clock_in_microseconds(
    manager: socket.socket,
) -> None:
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert sdnotify.reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    reloading, monotonic = receive(manager)
    assert reloading == "RELOADING=1"
    key, _, value = monotonic.partition("=")
    assert key == "MONOTONIC_USEC"
    assert value.isdigit()
    assert before <= int(value) <= after


def test_abstract_socket_address(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"virtiofs-reattach-test-{os.getpid()}-{time.monotonic_ns()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(RECV_DEADLINE)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert sdnotify.notify("READY=1")
        assert receive(sock) == ["READY=1"]


def test_no_notify_socket_means_not_under_systemd(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sdnotify.notify("READY=1") is False
    monkeypatch.setenv("NOTIFY_SOCKET", "")
    assert sdnotify.ready("x") is False


def test_vsock_address_is_not_ours_to_use(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", "vsock:2:1234")
    assert sdnotify.notify("READY=1") is False


def test_vanished_socket_returns_false_and_logs_once_at_debug(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="watcher.sdnotify")
    gone = tmp_path / "gone.sock"
    monkeypatch.setenv("NOTIFY_SOCKET", str(gone))
    assert sdnotify.notify("READY=1") is False
    assert sdnotify.notify("WATCHDOG=1") is False
    records = [r for r in caplog.records if r.name == "watcher.sdnotify"]
    assert len(records) == 1
    assert records[0].levelno == logging.DEBUG
    assert str(gone) in records[0].getMessage()


def test_socket_file_with_nobody_listening_returns_false(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stale = tmp_path / "stale.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(stale))
    assert stale.exists()
    monkeypatch.setenv("NOTIFY_SOCKET", str(stale))
    assert sdnotify.notify("READY=1") is False


def test_a_field_with_a_newline_is_refused(manager: socket.socket) -> None:
    with pytest.raises(ValueError, match="one KEY=value line"):
        sdnotify.notify("STATUS=a\nREADY=1")


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, None),
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "{self}"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "{other}"}, None),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "nope"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
    ],
)
def test_watchdog_interval(
    env: dict[str, str], expected: float | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    for key, value in env.items():
        pid = value.format(self=os.getpid(), other=os.getpid() + 1)
        monkeypatch.setenv(key, pid)
    assert sdnotify.watchdog_interval() == expected


async def test_watchdog_loop_pings_from_the_event_loop_until_cancelled(
    manager: socket.socket,
) -> None:
    manager.setblocking(False)
    loop = asyncio.get_running_loop()
    task = asyncio.create_task(sdnotify.watchdog_loop(0.01))
    try:
        for _ in range(2):
            datagram = await asyncio.wait_for(loop.sock_recv(manager, 4096), RECV_DEADLINE)
            assert datagram == b"WATCHDOG=1"
    finally:
        task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_a_blocked_event_loop_sends_no_watchdog_ping(manager: socket.socket) -> None:
    """The point of pinging from the loop: a stuck loop must make systemd restart us."""
    manager.setblocking(False)
    loop = asyncio.get_running_loop()
    task = asyncio.create_task(sdnotify.watchdog_loop(0.001))
    try:
        assert await asyncio.wait_for(loop.sock_recv(manager, 4096), RECV_DEADLINE)
        while _pending_datagram(manager):
            pass
        time.sleep(0.1)  # noqa: ASYNC251 (the point: the loop is stuck for a hundred intervals)
        assert not _pending_datagram(manager)
    finally:
        task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


def _pending_datagram(sock: socket.socket) -> bool:
    try:
        sock.recv(4096)
    except BlockingIOError:
        return False
    return True


def test_a_full_manager_queue_drops_the_message_instead_of_blocking(
    manager: socket.socket,
) -> None:
    sent = 0
    while sdnotify.status(f"update {sent}"):
        sent += 1
        assert sent < 100_000, "the receive queue never filled"
    assert receive(manager) == ["STATUS=update 0"]


# ---- the STATUS= line the service sends (service.status_line) -------------------------------


def vm(name: str, socket: SocketState, *states: ShareState) -> VmStatus:
    status = VmStatus(name=name, api_socket=f"/run/ch/{name}.sock", socket=socket)
    for i, state in enumerate(states):
        status.shares[f"s{i}"] = ShareStatus(f"s{i}", f"cocoon-fs-s{i}", state)
    return status


LIVE, ABSENT = SocketState.LIVE, SocketState.ABSENT
ATTACHED, FAILED = ShareState.ATTACHED, ShareState.FAILED


@pytest.mark.parametrize(
    ("vms", "expected"),
    [
        ([], "no VMs configured"),
        ([vm("a", LIVE, ATTACHED)], "1 of 1 VM running, 1/1 share attached"),
        (
            [vm("a", LIVE, ATTACHED, ATTACHED), vm("b", LIVE, ATTACHED), vm("c", ABSENT, FAILED)],
            "2 of 3 VMs running, 3/3 shares attached",  # c's share does not count: c is off
        ),
        ([vm("a", ABSENT, ATTACHED), vm("b", ABSENT)], "0 of 2 VMs running"),
        (
            [
                vm("a", LIVE, ATTACHED, ShareState.PENDING, ShareState.WAITING_BACKEND),
                vm("b", LIVE, ShareState.RETRYING, ShareState.WAITING_EJECT, FAILED),
            ],
            "2 of 2 VMs running, 1/6 shares attached, 4 waiting, 1 failed",
        ),
        ([vm("a", LIVE, FAILED)], "1 of 1 VM running, 0/1 share attached, 1 failed"),
    ],
)
def test_status_line_counts_what_is_not_fine_only_when_there_is_some(
    vms: list[VmStatus], expected: str
) -> None:
    assert status_line(vms, config_valid=True) == expected


def test_status_line_says_when_the_config_is_invalid() -> None:
    assert status_line([vm("a", LIVE, ATTACHED)], config_valid=False) == (
        "1 of 1 VM running, 1/1 share attached; config invalid, running the last good one"
    )
