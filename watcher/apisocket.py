"""Where Cloud Hypervisor API sockets live, and which VM a socket path belongs to.

The daemon learns that a CH process (re)started only from its API socket file
appearing (cloud-hypervisor-api.md §6: CH binds the socket before the VM is even
created, and a CH restart creates a new file at the same path). So the one thing
the watcher has is a path, and this module turns a configured template such as
``/run/cloud-hypervisor/{vm}.sock`` or Cocoon's
``/var/lib/cocoon/run/cloudhypervisor/{vm}/api.sock`` into two answers: which
directory to watch, and whether a path that showed up is some VM's socket.

The answer must be exact. Next to every socket CH v53+ keeps a ``<socket>.lock``
file that is never deleted (§6), and a VM may legally be called ``web01.sock``, so
"starts with the prefix" is not enough: the part between the template's fixed
prefix and suffix must itself be a valid VM name.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

VM_NAME_RE = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9._-]{0,62}\Z")
"""A VM name: 1-63 characters, never "." or "..", never containing "/".

Anchored with ``\\A``/``\\Z`` rather than ``^``/``$`` so that ``match`` cannot
accept a trailing newline.
"""

VM_NAME_RULE = "use 1-63 letters, digits, '.', '_' or '-', starting with a letter or digit"

_PLACEHOLDER = "{vm}"

_CONTROL_CHARACTER_RE = re.compile(r"[\x00-\x1f\x7f]")


def path_problem(path: str, *, normalised: bool = True) -> str | None:
    """Say what is wrong with ``path`` as an absolute (and normalised) path, or None.

    The daemon compares socket paths as strings (inotify reports names, and the
    one-socket-per-device rule is checked on paths), so ``/run//ch`` and ``/run/ch``
    would be two places to it; insisting on one spelling keeps those comparisons
    exact. The text is "<what> (<how to fix>)", ready for a config problem line.

    Control characters are refused: a NUL cannot be passed to the kernel at all
    (Python raises "embedded null byte" only when the daemon first uses the path,
    long after ``check`` passed), and the others, though legal in a file name,
    are invisible in logs and almost always a TOML escape typed by mistake
    (``"/srv\\new"`` is "/srv", a newline, "ew").
    """
    shown = _quote(path)
    control = _CONTROL_CHARACTER_RE.search(path)
    if control is not None:
        return (
            f"{shown} contains the control character U+{ord(control.group()):04X} "
            "(remove it; in a double-quoted TOML string a backslash starts an escape, "
            "so write \\\\ for a backslash or use single quotes)"
        )
    if not path.startswith("/"):
        return f"{shown} is not an absolute path (start it with '/')"
    if not normalised or path == "/":
        return None
    if any(part in ("", ".", "..") for part in path[1:].split("/")):
        return (
            f"{shown} is not a normalised path "
            "(remove empty, '.' and '..' components and any trailing slash)"
        )
    return None


@dataclass(frozen=True)
class ApiSocketPattern:
    """A validated API socket template with exactly one ``{vm}`` in one path component."""

    template: str
    _prefix: str = field(init=False, repr=False, compare=False)
    _suffix: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        problem = _template_problem(self.template)
        if problem is not None:
            raise ValueError(problem)
        prefix, suffix = self.template.split(_PLACEHOLDER)
        object.__setattr__(self, "_prefix", prefix)
        object.__setattr__(self, "_suffix", suffix)

    @classmethod
    def parse(cls, text: str) -> ApiSocketPattern:
        """Validate ``text``; the ValueError's message is "<what> (<how to fix>)"."""
        return cls(text)

    def path_for(self, vm: str) -> str:
        """The socket path of VM ``vm``; refuses names the pattern could not read back."""
        if not VM_NAME_RE.match(vm):
            raise ValueError(f"{vm!r} is not a valid VM name")
        return f"{self._prefix}{vm}{self._suffix}"

    def vm_for(self, path: str) -> str | None:
        """The VM whose socket is exactly ``path``, or None.

        The name must fit VM_NAME_RE, which has no "/" and cannot be "." or "..",
        so the name cannot reach into another path component.
        """
        if len(path) < len(self._prefix) + len(self._suffix):
            return None
        if not (path.startswith(self._prefix) and path.endswith(self._suffix)):
            return None
        name = path[len(self._prefix) : len(path) - len(self._suffix)]
        return name if VM_NAME_RE.match(name) else None

    @property
    def watch_root(self) -> str:
        """The directory holding the component that contains ``{vm}``.

        It is the deepest directory that exists independently of any VM, so it is
        where an inotify watch can be placed before the first VM starts.
        """
        root = self._prefix[: self._prefix.rindex("/")]
        return root or "/"

    @property
    def depth(self) -> int:
        """How many directories below ``watch_root`` the socket sits (0 = directly in it).

        With depth > 0 each VM has its own directory (Cocoon: ``{vm}/api.sock``),
        which the watcher must watch as it appears before the socket shows up.
        """
        return self._suffix.count("/")


def _template_problem(template: str) -> str | None:
    shown = _quote(template)
    count = template.count(_PLACEHOLDER)
    if count == 0:
        return (
            f"{shown} has no {{vm}} placeholder "
            '(put {vm} where the VM name appears, e.g. "/run/cloud-hypervisor/{vm}.sock")'
        )
    if count > 1:
        return (
            f"{shown} has {{vm}} more than once "
            "(use it exactly once: the VM name is read back from that one place)"
        )
    if "{" in template.replace(_PLACEHOLDER, "") or "}" in template.replace(_PLACEHOLDER, ""):
        return f"{shown} has '{{' or '}}' outside the {{vm}} placeholder (only {{vm}} is supported)"
    return path_problem(template)


def _quote(text: str) -> str:
    """Show a user's string as a TOML basic string, so it can be found in the file.

    JSON escapes every control character TOML does except DEL, which would be invisible.
    """
    return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007f")
