"""Which virtiofsd to run for a managed share, and the flags that binary understands.

Two generations of virtiofsd are in the field and take different flags (virtiofsd.md §1 and
appendix):

* the Rust virtiofsd (Debian 13, ``/usr/libexec/virtiofsd``): ``--shared-dir=DIR --cache=MODE
  [--readonly]``, cache modes auto/always/never/metadata;
* the legacy C virtiofsd of QEMU 7.2 (Debian 12's qemu-system-common, ``/usr/lib/qemu/virtiofsd``):
  ``-o source=DIR -o cache=MODE``, cache modes auto/always/none only, and no read-only mode at
  all: ``-o ro`` and ``-o readonly`` both fail with "fuse: unknown option(s)" (observed with
  7.2.22).

Like libvirt we tell them apart by asking the binary, not by its path or version string:
``--print-capabilities`` lists ``separate-options`` among its features only for the Rust one (the
legacy one prints just ``{"type": "fs"}``). Both take ``--fd=N``, an inherited listening socket,
which is how the supervisor keeps one socket across virtiofsd processes (virtiofsd.md §3).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass

from .config import Share
from .logs import kv

log = logging.getLogger("watcher.backends")

CANDIDATES = ("/usr/libexec/virtiofsd", "/usr/lib/virtiofsd")
"""Where Debian 13 and other distributions install the Rust virtiofsd."""

LEGACY = "/usr/lib/qemu/virtiofsd"
"""Debian 12's legacy C virtiofsd: the last resort, after $PATH, because it cannot export
read-only and a Rust virtiofsd someone installed (say in /usr/local/bin) is the better one."""

LISTENER_FD = 3
"""The descriptor number the listening socket has in the child (``--fd=3``, as Kata and Incus)."""

PROBE_TIMEOUT = 10.0
"""``--print-capabilities`` answers at once; the bound keeps a broken binary from hanging us."""

LEGACY_CACHE = {"auto": "auto", "always": "always", "never": "none", "metadata": "auto"}
"""Our cache names (the Rust ones) in the legacy binary's words; it has no ``metadata`` mode."""


class BackendError(Exception):
    """A share's virtiofsd cannot be started at all: retrying will not help until the host or
    the configuration changes. The message says what to change."""


@dataclass(frozen=True)
class Virtiofsd:
    """One virtiofsd binary and whether it takes the Rust flags (``separate-options``)."""

    path: str
    separate_options: bool

    def argv(self, share: Share, extra_args: Sequence[str]) -> list[str]:
        """The command line for ``share``, listening on the inherited ``LISTENER_FD``.

        Raises BackendError for what this binary cannot do (read-only on the legacy one).
        """
        if share.shared_dir is None:
            raise ValueError(f"share {share.vm}/{share.tag} is not managed (no shared_dir)")
        argv = [self.path, f"--fd={LISTENER_FD}"]
        if self.separate_options:
            argv += [f"--shared-dir={share.shared_dir}", f"--cache={share.cache}"]
            if share.readonly:
                argv.append("--readonly")
        else:
            if share.readonly:
                raise BackendError(
                    f"{self.path} is the legacy QEMU virtiofsd, which has no read-only mode "
                    "(install the Rust virtiofsd, Debian 13's virtiofsd package, "
                    "or set readonly = false for this share)"
                )
            if share.cache == "metadata":
                log.info(
                    kv(
                        "legacy virtiofsd has no cache=metadata, using cache=auto",
                        vm=share.vm,
                        tag=share.tag,
                        virtiofsd=self.path,
                    )
                )
            argv += ["-o", f"source={share.shared_dir}", "-o", f"cache={LEGACY_CACHE[share.cache]}"]
        return argv + list(extra_args)


def find_virtiofsd(configured: str | None) -> str:
    """The binary to run: ``[backend] virtiofsd`` if set, else the first one installed."""
    if configured is not None:
        if os.path.isfile(configured) and os.access(configured, os.X_OK):
            return configured
        raise BackendError(
            f"[backend] virtiofsd {configured} is not an executable file "
            "(fix the path, or remove the setting to use the installed virtiofsd)"
        )
    for candidate in CANDIDATES:
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    on_path = shutil.which("virtiofsd")
    if on_path is not None:
        return on_path
    if os.path.isfile(LEGACY) and os.access(LEGACY, os.X_OK):
        return LEGACY
    raise BackendError(
        "no virtiofsd found: install virtiofsd (Debian 13) or qemu-system-common (Debian 12), "
        "or set [backend] virtiofsd"
    )


async def probe(path: str, timeout: float = PROBE_TIMEOUT) -> Virtiofsd:
    """Ask ``path --print-capabilities`` which flag style it takes, as libvirt does."""
    try:
        proc = await asyncio.create_subprocess_exec(
            path,
            "--print-capabilities",
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
    except OSError as err:
        raise BackendError(f"cannot run {path}: {err.strerror}") from None
    try:
        async with asyncio.timeout(timeout):
            out, errors = await proc.communicate()
    except TimeoutError:
        raise BackendError(
            f"{path} --print-capabilities did not answer within {timeout:g}s "
            "(is it a virtiofsd? set [backend] virtiofsd)"
        ) from None
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    features = _features(out) if proc.returncode == 0 else None
    if features is None:
        said = (errors or out).decode(errors="replace").strip().splitlines()
        how = "printed no vhost-user capabilities" if proc.returncode == 0 else "failed"
        raise BackendError(
            f"{path} --print-capabilities {how} (rc {proc.returncode}"
            f"{': ' + said[-1] if said else ''}); is it a virtiofsd? set [backend] virtiofsd"
        )
    return Virtiofsd(path, "separate-options" in features)


def _features(capabilities: bytes) -> list[object] | None:
    """The ``features`` of a vhost-user capabilities document; [] when it lists none."""
    try:
        document = json.loads(capabilities)
    except ValueError:
        return None
    if not isinstance(document, dict):
        return None
    features = document.get("features", [])
    return features if isinstance(features, list) else None
