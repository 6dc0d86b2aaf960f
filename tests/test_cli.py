"""The command line as users run it: exit codes and what is printed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

GOOD = """
[watch]
api_socket = "/run/ch/{vm}.sock"
[vm.web01]
fs = [ { tag = "data", socket = "/run/vfs/web01-data.sock" } ]
"""

LEGACY_VIRTIOFSD = "/usr/lib/qemu/virtiofsd"


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "watcher", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )


def test_check_accepts_a_valid_file(tmp_path: Path) -> None:
    config = tmp_path / "mounts.toml"
    config.write_text(GOOD)
    result = cli("check", "-c", str(config))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.endswith(": valid (1 VM, 1 share, 1 file)\n")


def test_check_accepts_the_shipped_example() -> None:
    example = Path(__file__).parent.parent / "config" / "mounts.toml"
    assert cli("check", "-c", str(example)).returncode == 0


@pytest.mark.skipif(not os.access(LEGACY_VIRTIOFSD, os.X_OK), reason="needs qemu-system-common")
def test_check_warns_about_what_would_stop_a_managed_share_here(tmp_path: Path) -> None:
    """Valid config, but this machine could not run it: exit 0 (the file may be
    meant for another host) with one warning line per share and the fix."""
    config = tmp_path / "mounts.toml"
    managed = (
        f'[vm.db01]\nfs = [ {{ tag = "ro", shared_dir = "{tmp_path}", readonly = true }},'
        f' {{ tag = "gone", shared_dir = "{tmp_path / "gone"}" }} ]\n'
    )
    config.write_text(f'{GOOD}[backend]\nvirtiofsd = "{LEGACY_VIRTIOFSD}"\n{managed}')
    result = cli("check", "-c", str(config))
    assert result.returncode == 0, result.stdout + result.stderr
    warnings = [line for line in result.stdout.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 2, result.stdout
    assert warnings[0].startswith("warning: vm db01 share ro: ")
    assert "no read-only mode" in warnings[0]
    assert warnings[1].startswith("warning: vm db01 share gone: shared_dir")
    assert "(create it" in warnings[1]

    config.write_text(f'{GOOD}[backend]\nvirtiofsd = "{tmp_path / "nope"}"\n{managed}')
    result = cli("check", "-c", str(config))
    assert result.returncode == 0
    assert "warning: managed shares cannot run here: [backend] virtiofsd" in result.stdout


def test_check_lists_every_problem_one_a_line_and_exits_1(tmp_path: Path) -> None:
    config = tmp_path / "mounts.toml"
    config.write_text(
        GOOD.replace('tag = "data"', 'tag = "my tag"').replace("[vm.web01]", "[vm.web01]\nfoo = 1")
    )
    result = cli("check", "-c", str(config))
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    assert len(lines) == 2, lines
    assert any(
        line.startswith(f'{config}: vm.web01.fs[0].tag: "my tag" is not a valid tag (')
        for line in lines
    )
    assert any(line.startswith(f"{config}: vm.web01.foo: unknown key") for line in lines)


def test_check_reports_toml_syntax_errors_with_line_and_column(tmp_path: Path) -> None:
    config = tmp_path / "mounts.toml"
    config.write_text('[watch]\napi_socket = "/run/ch/{vm}.sock\n')
    result = cli("check", "-c", str(config))
    assert result.returncode == 1
    assert result.stdout.startswith(f"{config}:2:")


def test_check_uses_the_environment_variable(tmp_path: Path) -> None:
    config = tmp_path / "elsewhere.toml"
    config.write_text(GOOD)
    env = {"VIRTIOFS_REATTACH_CONFIG": str(config), "PATH": "/usr/bin:/bin"}
    result = cli("check", env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert str(config) in result.stdout


@pytest.mark.parametrize("args", [(), ("check", "--bogus"), ("frobnicate",)])
def test_usage_errors_exit_2(args: tuple[str, ...]) -> None:
    assert cli(*args).returncode == 2


def test_run_with_an_invalid_config_exits_1_and_says_why(tmp_path: Path) -> None:
    config = tmp_path / "mounts.toml"
    config.write_text("[watch]\n")
    result = cli("run", "-c", str(config))
    assert result.returncode == 1
    assert "config invalid" in result.stderr
    assert "watch.api_socket" in result.stderr
