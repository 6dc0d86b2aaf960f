"""The virtiofsd@.socket / virtiofsd@.service templates, checked by systemd-analyze.

An instance of each template is verified from a temp folder holding copies,
with ExecStart's binary pointed at one that exists here (verify reports a
missing binary); any output at all fails, because verify exits 0 on unknown
keys and unparsable values (python-stack.md §6).
"""

from __future__ import annotations

import sys
from pathlib import Path

from tests.test_systemd_units import SYSTEMD_DIR, needs_systemd_analyze, settings, systemd_analyze

SOCKET = SYSTEMD_DIR / "virtiofsd@.socket"
SERVICE = SYSTEMD_DIR / "virtiofsd@.service"
SHIPPED_BINARY = "/usr/libexec/virtiofsd"


def copies(folder: Path) -> None:
    (folder / SOCKET.name).write_text(SOCKET.read_text())
    text = SERVICE.read_text()
    assert f"ExecStart={SHIPPED_BINARY} " in text
    (folder / SERVICE.name).write_text(
        text.replace(f"ExecStart={SHIPPED_BINARY} ", f"ExecStart={sys.executable} ")
    )


@needs_systemd_analyze
def test_template_instances_verify_without_output(tmp_path: Path) -> None:
    copies(tmp_path)
    output = systemd_analyze(
        "verify",
        "--man=no",
        str(tmp_path / "virtiofsd@web01-data.socket"),
        str(tmp_path / "virtiofsd@web01-data.service"),
    )
    assert output == ""


@needs_systemd_analyze
def test_template_verify_would_catch_a_mistake(tmp_path: Path) -> None:
    copies(tmp_path)
    service = tmp_path / SERVICE.name
    service.write_text(service.read_text().replace("Type=exec", "Type=exce"))
    output = systemd_analyze("verify", "--man=no", str(tmp_path / "virtiofsd@x.service"))
    assert "Failed to parse service type" in output


def test_templates_hand_virtiofsd_the_listening_socket() -> None:
    """The pattern of cloud-hypervisor-api.md §6 / virtiofsd.md §3: systemd listens,
    virtiofsd gets the socket as fd 3 and serves one connection per instance."""
    socket = settings(SOCKET)
    service = settings(SERVICE)
    assert socket["Socket.Accept"] == ["no"]
    assert socket["Socket.ListenStream"] == ["/run/virtiofsd/%i.sock"]
    (exec_start,) = service["Service.ExecStart"]
    assert exec_start.startswith(f"{SHIPPED_BINARY} --fd=3 ")
    assert "Service.Restart" not in service  # the socket starts the next one
