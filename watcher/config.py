"""Load and validate ``mounts.toml`` and its ``mounts.d/*.toml`` drop-ins.

Three facts shape this module:

* The file is read with tomli, not the stdlib ``tomllib``, on Python < 3.15:
  tomli >= 2.4 speaks TOML 1.1 (multi-line inline tables with a trailing comma,
  handy for ``fs = [...]`` lists) and gives syntax errors a line and column on
  every Python; ``tomllib`` before 3.15 rejects TOML 1.1, so one file would be
  valid on one host and broken on another (python-stack.md §4).
* Neither parser reports where a *value* sits, so semantic problems name the
  dotted key path (``vm.web01.fs[1].tag``) instead of a line, and every problem
  in every file is collected before raising, so an operator fixes the file in
  one pass instead of one restart per mistake (python-stack.md §4).
* Cloud Hypervisor accepts far more than is safe. It never checks that two fs
  devices use different virtiofsd sockets, and a second vhost-user connect to a
  virtiofsd that already serves a frontend can hang CH's single VMM thread, and
  with it the whole API, with no timeout (cloud-hypervisor-api.md §7). So socket
  paths are unique across every VM in every file, and the checks CH would only
  make at ``vm.add-fs`` time (queue size, ``__`` ids, 36-byte tags, §2) are made
  here, where the message can name the line to change.

Every problem is one line: ``<file>:<line>:<col>: <msg>`` for TOML syntax, and
``<file>: <key path>: <what is wrong> (<how to fix>)`` for everything else.
"""

from __future__ import annotations

import codecs
import difflib
import json
import math
import os
import posixpath
import re
import stat
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Literal

if sys.version_info >= (3, 15):
    import tomllib
else:
    import tomli as tomllib

from .apisocket import VM_NAME_RE, VM_NAME_RULE, ApiSocketPattern, path_problem
from .daemonlock import LOCK_NAME

DEFAULT_CONFIG_PATH = "/etc/virtiofs-reattach/mounts.toml"
DROP_IN_DIR = "mounts.d"

DEFAULT_DEVICE_ID_PREFIX = "cocoon-fs-"
DEFAULT_NUM_QUEUES = 1
DEFAULT_QUEUE_SIZE = 1024
DEFAULT_RUNTIME_DIR = "/run/virtiofs-reattach"
DEFAULT_STATE_PATH = posixpath.join(DEFAULT_RUNTIME_DIR, "state.json")
"""Where the daemon writes its state document unless told otherwise (statusfile)."""
CACHE_MODES = ("auto", "always", "never", "metadata")

SUN_PATH_MAX = 107
"""Longest unix socket path: ``sun_path`` is 108 bytes including the final NUL."""

MAX_CONFIG_BYTES = 16 * 1024 * 1024
"""Largest file read: 100,000 VMs take about 5 MiB, and a device such as /dev/zero never ends."""

MAX_NUM_QUEUES = 2046
"""The most request queues a CH fs device can have, whatever the VM's size.

CH checks num_queues only against the VM's boot vCPUs (cloud-hypervisor-api.md §2),
and allows up to 8192 vCPUs on KVM x86_64 (``vmm/src/config.rs:40``). But a PCI
device has at most 2048 MSI-X vectors and CH's fs device takes one per request
queue plus one for the hiprio queue and one for config; past that CH does not
refuse, it panics on an assert (``virtio-devices/src/transport/pci_device.rs:457``,
``pci/src/msix.rs:147``). Without a bound ``num_queues = 99999999999999999999``
would pass ``check`` and fail only at attach time."""

MAX_QUEUE_SIZE = 32768
"""CH: "Queue size must be a power of 2 no greater than 32768" (cloud-hypervisor-api.md §2)."""

TAG_RE = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9_-]{0,35}\Z")
"""Mount tags: CH's REST path silently truncates tags to 36 bytes (§2), so longer is refused."""

DEVICE_ID_PREFIX_RE = re.compile(r"\A(?:[A-Za-z0-9][A-Za-z0-9_.-]{0,31})?\Z")
"""Device id prefixes: CH rejects ids starting "__" (§2), so the first character is alphanumeric."""


@dataclass(frozen=True)
class Share:
    """One virtiofs share of one VM, with every default already applied."""

    vm: str
    tag: str
    socket: str
    num_queues: int
    queue_size: int
    device_id: str
    shared_dir: str | None = None
    readonly: bool = False
    cache: str = "auto"

    @property
    def managed(self) -> bool:
        """The daemon runs this share's virtiofsd (it has a shared_dir)."""
        return self.shared_dir is not None


@dataclass(frozen=True)
class WatchSettings:
    """Where the VMs' API sockets appear, and how our devices are recognised."""

    api_socket: ApiSocketPattern
    device_id_prefix: str = DEFAULT_DEVICE_ID_PREFIX
    prune: bool = False


@dataclass(frozen=True)
class RetrySettings:
    """Backoff for attach attempts, in seconds; give_up_after 0 means never give up.

    resync: how often a running VM is looked at again without any event (0:
    never). Some losses raise no event the daemon can see: on CH >= v52 a
    reboot that fails to reconnect a backend leaves the VM config without its
    fs devices, and a person may remove a device by hand."""

    initial_delay: float = 0.2
    max_delay: float = 30.0
    give_up_after: float = 0.0
    resync: float = 60.0


@dataclass(frozen=True)
class BackendSettings:
    """How the daemon runs virtiofsd for managed shares."""

    virtiofsd: str | None = None
    extra_args: tuple[str, ...] = ()
    runtime_dir: str = DEFAULT_RUNTIME_DIR
    start: Literal["always", "on-demand"] = "always"

    def default_socket(self, vm: str, tag: str) -> str:
        """The socket of a managed share that names none: one directory per VM."""
        return posixpath.join(self.runtime_dir, vm, f"{tag}.sock")


@dataclass(frozen=True)
class Config:
    """A fully validated configuration; compared with == on reload."""

    files: tuple[str, ...]
    watch: WatchSettings
    retry: RetrySettings
    backend: BackendSettings
    vms: Mapping[str, tuple[Share, ...]]


class ConfigError(Exception):
    """The configuration is invalid; ``problems`` holds one line per problem."""

    def __init__(self, problems: Iterable[str]) -> None:
        self.problems: tuple[str, ...] = tuple(problems)
        super().__init__("\n".join(self.problems))


def load_config(path: str, *, backend: BackendSettings | None = None) -> Config:
    """Read ``path`` and ``mounts.d/*.toml`` next to it, then validate them together.

    Drop-ins are taken in name order, skipping dot-files as a shell glob would
    (editors leave lock files such as ``.#web.toml`` there). ``backend``: see
    parse_config.
    """
    try:
        main = _read(path)
    except FileNotFoundError:
        raise ConfigError(
            [
                f"{path}: does not exist "
                "(create it; config/mounts.toml in the project is a commented example)"
            ]
        ) from None

    files = [(path, main)]
    problems: list[str] = []
    drop_in_dir = os.path.join(os.path.dirname(path), DROP_IN_DIR)
    try:
        names = sorted(os.listdir(drop_in_dir))
    except FileNotFoundError:
        names = []
    except OSError as err:
        names = []
        problems.append(
            f"{drop_in_dir}: cannot be listed: {err.strerror} (make it a readable directory)"
        )
    for name in names:
        if name.startswith(".") or not name.endswith(".toml"):
            continue
        drop_in = os.path.join(drop_in_dir, name)
        try:
            files.append((drop_in, _read(drop_in)))
        except FileNotFoundError as err:  # removed since it was listed
            problems.append(_unreadable(drop_in, err))
        except ConfigError as err:
            problems.extend(err.problems)

    try:
        config = parse_config(files, backend=backend)
    except ConfigError as err:
        problems.extend(err.problems)
    if problems:
        raise ConfigError(problems)
    return config


def parse_config(
    files: Sequence[tuple[str, bytes]], *, backend: BackendSettings | None = None
) -> Config:
    """Validate (display name, content) pairs, main file first, drop-ins after.

    Pure: no file system access, so tests and reload share one code path.
    ``backend``, when given, is used instead of the file's ``[backend]`` (which is
    still validated): a reload keeps the one in force, because the running
    virtiofsd, their records and the daemon lock live where it says.
    """
    if not files:
        raise ValueError("parse_config needs at least the main file")
    problems: list[str] = []
    documents = [(name, _parse_toml(name, content, problems)) for name, content in files]

    main_name, main_document = documents[0]
    main = _Table(main_name, "", main_document or {}, problems)
    main.allow_only(("watch", "defaults", "retry", "backend", "vm"))
    watch = _watch_settings(main, report_missing=main_document is not None)
    num_queues, queue_size = _share_defaults(main)
    retry = _retry_settings(main)
    in_file = _backend_settings(main)
    backend = in_file if backend is None else backend

    vms = _Vms(watch, backend, num_queues, queue_size, problems)
    for index, (name, document) in enumerate(documents):
        if document is None:
            continue
        table = _Table(name, "", document, problems)
        if index > 0:
            for key in document:
                if key != "vm":
                    table.problem(
                        key,
                        "not allowed in a drop-in, only [vm.*] tables are "
                        f"(move it to the main file {main_name})",
                    )
        vms.add_file(table)
    vms.check_reserved_sockets()

    if problems or watch is None:
        raise ConfigError(problems)
    return Config(
        files=tuple(name for name, _ in files),
        watch=watch,
        retry=retry,
        backend=backend,
        vms=MappingProxyType(vms.shares),
    )


def _read(path: str) -> bytes:
    """The content of ``path`` if it is a regular file (or a symlink to one).

    Anything else is refused with a ConfigError before it is read: opening a FIFO
    blocks until a writer appears and reading a device may never end, which would
    hang ``check`` and the daemon's reload. O_NONBLOCK makes opening a FIFO return
    at once, the type is taken from the open descriptor so nothing can be swapped
    in between, and reading stops after MAX_CONFIG_BYTES. Only a path that does
    not exist at all raises FileNotFoundError, for the caller to word.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except FileNotFoundError as missing:
        try:
            target = os.readlink(path)
        except OSError:  # not a symlink: the path itself does not exist
            raise missing from None
        raise ConfigError(
            [
                f"{path}: is a symbolic link to {_show(target)}, which does not exist "
                "(create the target or point the link at the config file)"
            ]
        ) from None
    except OSError as err:
        raise ConfigError([_unreadable(path, err)]) from None
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise ConfigError([f"{path}: is a directory (a config must be a plain file)"])
        if not stat.S_ISREG(mode):
            raise ConfigError([f"{path}: is not a regular file (a config must be a plain file)"])
        with os.fdopen(fd, "rb", closefd=False) as file:
            content = file.read(MAX_CONFIG_BYTES + 1)
    except OSError as err:
        raise ConfigError([_unreadable(path, err)]) from None
    finally:
        os.close(fd)
    if len(content) > MAX_CONFIG_BYTES:
        raise ConfigError(
            [
                f"{path}: is larger than {MAX_CONFIG_BYTES // (1024 * 1024)} MiB "
                "(check that it is the intended file; spread a config this large "
                "over mounts.d/*.toml drop-ins)"
            ]
        )
    return content


def _unreadable(path: str, err: OSError) -> str:
    return f"{path}: cannot be read: {err.strerror} (make it readable by the daemon or remove it)"


def _parse_toml(name: str, content: bytes, problems: list[str]) -> dict[str, object] | None:
    # Windows editors (Notepad among them) start UTF-8 files with a byte order mark,
    # which TOML does not allow; it is invisible, so dropping it keeps columns right.
    content = content.removeprefix(codecs.BOM_UTF8)
    try:
        text = content.decode("utf-8")
    except UnicodeDecodeError as err:
        line_start = content.rfind(b"\n", 0, err.start) + 1
        line = content.count(b"\n", 0, err.start) + 1
        column = len(content[line_start : err.start].decode("utf-8")) + 1
        problems.append(f"{name}:{line}:{column}: invalid UTF-8 (TOML files must be UTF-8)")
        return None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        problems.append(f"{name}:{err.lineno}:{err.colno}: {err.msg}")
        return None
    except RecursionError as err:  # tomli's own bound on nesting, or Python's
        problems.append(f"{name}: {err} (flatten it: a mounts file needs only a few levels)")
        return None


def _key(key: str) -> str:
    """A key as TOML writes it in a dotted path: bare when it can be, quoted otherwise."""
    if re.fullmatch(r"[A-Za-z0-9_-]+", key):
        return key
    return _show(key)


SHOWN_CHARS = 120
"""A longer string is cut in messages: a problem line stays one readable line."""


def _show(value: object) -> str:
    """A value as it appears in the TOML file, so the operator can search for it."""
    if isinstance(value, str):
        if len(value) > SHOWN_CHARS:
            return json.dumps(value[:SHOWN_CHARS], ensure_ascii=False)[:-1] + '..." (cut)'
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array"
    return f"the date/time {value}"


_STRING_FIX = "put the value in double quotes"


@dataclass
class _Table:
    """One TOML table being validated: knows its file and key path for problem lines."""

    file: str
    path: str
    data: Mapping[str, object]
    problems: list[str]

    def where(self, key: str) -> str:
        return f"{self.path}.{_key(key)}" if self.path else _key(key)

    def problem(self, key: str | None, text: str) -> None:
        self.problem_at(self.path if key is None else self.where(key), text)

    def problem_at(self, path: str, text: str) -> None:
        self.problems.append(f"{self.file}: {path}: {text}")

    def allow_only(self, allowed: Sequence[str]) -> None:
        for key in self.data:
            if key in allowed:
                continue
            close = difflib.get_close_matches(key, allowed, n=1)
            if close:
                self.problem(key, f"unknown key; did you mean {close[0]!r}?")
            else:
                self.problem(key, f"unknown key (remove it; allowed here: {', '.join(allowed)})")

    def require(self, key: str, fix: str) -> bool:
        if key in self.data:
            return True
        self.problem(key, f"missing ({fix})")
        return False

    def _wrong_type(self, key: str, expected: str, fix: str) -> None:
        self.problem(key, f"expected {expected}, got {_show(self.data[key])} ({fix})")

    def string(self, key: str) -> str | None:
        value = self.data.get(key)
        if value is None or isinstance(value, str):
            return value
        self._wrong_type(key, "a string", _STRING_FIX)
        return None

    def boolean(self, key: str) -> bool | None:
        value = self.data.get(key)
        if value is None or isinstance(value, bool):
            return value
        self._wrong_type(key, "a boolean", "write true or false without quotes")
        return None

    def integer(self, key: str) -> int | None:
        value = self.data.get(key)
        if value is None or (isinstance(value, int) and not isinstance(value, bool)):
            return value
        self._wrong_type(key, "an integer", "write a whole number without quotes")
        return None

    def seconds(self, key: str) -> float | None:
        value = self.data.get(key)
        if value is None:
            return None
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
        self._wrong_type(key, "a number of seconds", "write a number without quotes, e.g. 0.5")
        return None

    def array(self, key: str, fix: str) -> list[object] | None:
        value = self.data.get(key)
        if value is None or isinstance(value, list):
            return value
        self._wrong_type(key, "an array", fix)
        return None

    def table(self, key: str, fix: str) -> _Table | None:
        value = self.data.get(key)
        if value is None:
            return None
        if isinstance(value, dict):
            return _Table(self.file, self.where(key), value, self.problems)
        self._wrong_type(key, "a table", fix)
        return None

    def path_string(self, key: str, *, normalised: bool = True) -> str | None:
        value = self.string(key)
        if value is None:
            return None
        problem = path_problem(value, normalised=normalised)
        if problem is not None:
            self.problem(key, problem)
            return None
        return value

    def num_queues(self, key: str) -> int | None:
        value = self.integer(key)
        if value is not None and value < 1:
            self.problem(key, f"{value} is less than 1 (use 1 or more)")
            return None
        if value is not None and value > MAX_NUM_QUEUES:
            self.problem(
                key,
                f"{value} is more than {MAX_NUM_QUEUES}, the most a Cloud Hypervisor device "
                "can have (use at most the VM's number of boot vCPUs, which CH also requires; "
                "e.g. 1)",
            )
            return None
        return value

    def queue_size(self, key: str) -> int | None:
        """CH refuses other sizes only at add-fs time, long after the config was loaded."""
        value = self.integer(key)
        if value is not None and not (1 <= value <= MAX_QUEUE_SIZE and value & (value - 1) == 0):
            self.problem(
                key,
                f"{value} is not a power of two from 1 to {MAX_QUEUE_SIZE} "
                "(Cloud Hypervisor accepts only those; e.g. 1024)",
            )
            return None
        return value


def _watch_settings(main: _Table, *, report_missing: bool) -> WatchSettings | None:
    table = main.table("watch", "write it as a [watch] section")
    if table is None:
        if report_missing and "watch" not in main.data:
            main.problem(
                "watch",
                "missing (add a [watch] section with "
                'api_socket = "/run/cloud-hypervisor/{vm}.sock")',
            )
        return None
    table.allow_only(("api_socket", "device_id_prefix", "prune"))

    api_socket = None
    if table.require(
        "api_socket",
        "set it to where the VMs' API sockets appear, with {vm} standing for the VM name, "
        'e.g. "/run/cloud-hypervisor/{vm}.sock"',
    ):
        text = table.string("api_socket")
        if text is not None:
            try:
                api_socket = ApiSocketPattern.parse(text)
            except ValueError as err:
                table.problem("api_socket", str(err))

    prefix = table.string("device_id_prefix")
    if prefix is not None and not DEVICE_ID_PREFIX_RE.match(prefix):
        table.problem(
            "device_id_prefix",
            f"{_show(prefix)} is not a valid device id prefix (use up to 32 letters, digits, "
            "'_', '.' or '-', starting with a letter or digit, or \"\"; "
            'Cloud Hypervisor rejects ids starting with "__")',
        )
        prefix = None
    if prefix is None:
        prefix = DEFAULT_DEVICE_ID_PREFIX

    prune = table.boolean("prune") or False
    if prune and prefix == "":
        table.problem(
            "prune",
            "true needs a non-empty device_id_prefix (only ids carrying the prefix are pruned, "
            'and with "" our devices cannot be told apart from ones attached by others)',
        )

    if api_socket is None:
        return None
    return WatchSettings(api_socket=api_socket, device_id_prefix=prefix, prune=prune)


def _share_defaults(main: _Table) -> tuple[int, int]:
    table = main.table("defaults", "write it as a [defaults] section")
    if table is None:
        return DEFAULT_NUM_QUEUES, DEFAULT_QUEUE_SIZE
    table.allow_only(("num_queues", "queue_size"))
    num_queues = table.num_queues("num_queues")
    queue_size = table.queue_size("queue_size")
    return (
        DEFAULT_NUM_QUEUES if num_queues is None else num_queues,
        DEFAULT_QUEUE_SIZE if queue_size is None else queue_size,
    )


def _retry_settings(main: _Table) -> RetrySettings:
    default = RetrySettings()
    table = main.table("retry", "write it as a [retry] section")
    if table is None:
        return default
    table.allow_only(("initial_delay", "max_delay", "give_up_after", "resync"))

    initial_delay = table.seconds("initial_delay")
    if initial_delay is not None and initial_delay <= 0:
        table.problem(
            "initial_delay",
            f"{_show(table.data['initial_delay'])} is not more than 0 "
            "(use a positive number of seconds, e.g. 0.2)",
        )
        initial_delay = None
    initial_valid = initial_delay is not None or "initial_delay" not in table.data
    if initial_delay is None:
        initial_delay = default.initial_delay

    max_delay = table.seconds("max_delay")
    if max_delay is not None and initial_valid and max_delay < initial_delay:
        table.problem(
            "max_delay",
            f"{_show(table.data['max_delay'])} is less than initial_delay "
            f"{_show(table.data.get('initial_delay', initial_delay))} "
            "(raise max_delay or lower initial_delay)",
        )

    give_up_after = table.seconds("give_up_after")
    if give_up_after is not None and give_up_after < 0:
        table.problem(
            "give_up_after",
            f"{_show(table.data['give_up_after'])} is negative "
            "(use 0 to keep trying while the VM's API socket is live, or a number of seconds)",
        )

    resync = table.seconds("resync")
    if resync is not None and resync < 0:
        table.problem(
            "resync",
            f"{_show(table.data['resync'])} is negative "
            "(use a number of seconds, or 0 to look at running VMs only when something changes)",
        )
        resync = None

    return RetrySettings(
        initial_delay=initial_delay,
        max_delay=default.max_delay if max_delay is None else max_delay,
        give_up_after=default.give_up_after if give_up_after is None else give_up_after,
        resync=default.resync if resync is None else resync,
    )


def _backend_settings(main: _Table) -> BackendSettings:
    default = BackendSettings()
    table = main.table("backend", "write it as a [backend] section")
    if table is None:
        return default
    table.allow_only(("virtiofsd", "extra_args", "runtime_dir", "start"))

    virtiofsd = table.path_string("virtiofsd", normalised=False)

    extra_args: list[str] = []
    items = table.array("extra_args", 'write it as ["--flag", ...]') or []
    for index, item in enumerate(items):
        where = f"{table.where('extra_args')}[{index}]"
        if not isinstance(item, str):
            table.problem_at(where, f"expected a string, got {_show(item)} ({_STRING_FIX})")
        elif "\0" in item:
            table.problem_at(
                where,
                f"{_show(item)} contains a NUL character "
                "(remove it; a program argument cannot hold one)",
            )
        else:
            extra_args.append(item)

    runtime_dir = table.path_string("runtime_dir")

    start: Literal["always", "on-demand"] = "always"
    start_text = table.string("start")
    if start_text == "on-demand":
        start = "on-demand"
    elif start_text is not None and start_text != "always":
        table.problem(
            "start", f'{_show(start_text)} is not a start mode (use "always" or "on-demand")'
        )

    return BackendSettings(
        virtiofsd=virtiofsd,
        extra_args=tuple(extra_args),
        runtime_dir=default.runtime_dir if runtime_dir is None else runtime_dir,
        start=start,
    )


_SHARE_KEYS = ("tag", "socket", "shared_dir", "readonly", "cache", "num_queues", "queue_size")
_SHARE_EXAMPLE = '{ tag = "data", socket = "/run/virtiofsd/data.sock" }'


class _Vms:
    """The VMs of all files, and the rules that span files.

    A VM lives in exactly one file, so a drop-in cannot silently change another
    file's VM; a socket serves exactly one device anywhere, because a second
    vhost-user frontend on one virtiofsd can hang CH (cloud-hypervisor-api.md §7);
    and no socket is a file the daemon keeps for itself, which binding a
    listener there would replace, or which the daemon would write over the socket.
    """

    def __init__(
        self,
        watch: WatchSettings | None,
        backend: BackendSettings,
        num_queues: int,
        queue_size: int,
        problems: list[str],
    ) -> None:
        self.shares: dict[str, tuple[Share, ...]] = {}
        self._watch = watch
        self._backend = backend
        self._num_queues = num_queues
        self._queue_size = queue_size
        self._problems = problems
        self._declared_in: dict[str, str] = {}
        self._socket_users: dict[str, str] = {}
        self._sockets: list[tuple[_Table, str | None, str]] = []
        """(share table, "socket" or None for the managed default, path) of every kept share."""

    def add_file(self, root: _Table) -> None:
        vms = root.table("vm", "write each VM as a [vm.NAME] section")
        if vms is not None:
            for name in vms.data:
                self._add_vm(vms, name)

    def _add_vm(self, vms: _Table, name: str) -> None:
        # A VM that is invalid or declared twice is still checked, but not kept,
        # and its sockets are not counted (they would only repeat the first one's).
        keep = False
        if not VM_NAME_RE.match(name):
            vms.problem(name, f"{_show(name)} is not a valid VM name ({VM_NAME_RULE})")
        elif name in self._declared_in:
            vms.problem(
                name,
                f"already declared in {self._declared_in[name]} (declare each VM in one file only)",
            )
        else:
            self._declared_in[name] = vms.file
            keep = True

        table = vms.table(name, "write it as a [vm.NAME] section with fs = [ ... ]")
        if table is None:
            return
        table.allow_only(("fs",))
        if keep and self._watch is not None:
            api_socket = self._watch.api_socket.path_for(name)
            length = len(os.fsencode(api_socket))
            if length > SUN_PATH_MAX:
                table.problem(
                    None,
                    f"its API socket {_show(api_socket)} is {length} bytes, over the "
                    f"{SUN_PATH_MAX}-byte limit of a unix socket path "
                    "(use a shorter VM name or watch.api_socket)",
                )

        items = table.array("fs", f"write it as fs = [ {_SHARE_EXAMPLE} ]") or []
        tags: dict[str, str] = {}
        shares = [
            self._share(table, name, index, item, tags, keep) for index, item in enumerate(items)
        ]
        if keep:
            self.shares[name] = tuple(share for share in shares if share is not None)

    def _share(
        self, vm_table: _Table, vm: str, index: int, item: object, tags: dict[str, str], keep: bool
    ) -> Share | None:
        path = f"{vm_table.where('fs')}[{index}]"
        if not isinstance(item, dict):
            vm_table.problem_at(
                path, f"expected a table, got {_show(item)} (write each share as {_SHARE_EXAMPLE})"
            )
            return None
        problems_before = len(self._problems)
        share = _Table(vm_table.file, path, item, self._problems)
        share.allow_only(_SHARE_KEYS)

        tag = None
        if share.require("tag", 'set the mount tag the guest mounts, e.g. tag = "data"'):
            tag = share.string("tag")
        if tag is not None and not TAG_RE.match(tag):
            share.problem(
                "tag",
                f"{_show(tag)} is not a valid tag "
                "(use 1-36 letters, digits, '_' or '-', starting with a letter or digit)",
            )
            tag = None
        elif tag is not None and tag in tags:
            share.problem(
                "tag",
                f"{_show(tag)} is already the tag of {tags[tag]} "
                "(give each share of a VM its own tag)",
            )
        elif tag is not None:
            tags[tag] = path

        socket = share.path_string("socket")
        shared_dir = share.path_string("shared_dir", normalised=False)
        readonly = share.boolean("readonly")
        cache = share.string("cache")
        if cache is not None and cache not in CACHE_MODES:
            share.problem(
                "cache",
                f"{_show(cache)} is not a cache mode "
                f"(use one of {', '.join(map(_show, CACHE_MODES))})",
            )
        if "shared_dir" not in item:
            for key in ("readonly", "cache"):
                if key in item:
                    share.problem(
                        key,
                        "only applies to a managed share (add shared_dir, or remove it: "
                        "a virtiofsd you run yourself takes its own flags)",
                    )
            if "socket" not in item:
                share.problem(
                    None,
                    "needs socket or shared_dir (set socket to use a virtiofsd you run, "
                    "or shared_dir to have the daemon run one)",
                )
        num_queues = share.num_queues("num_queues")
        queue_size = share.queue_size("queue_size")

        if socket is not None:
            socket_place = f"{share.file}: {share.where('socket')}"
            self._check_socket(share, "socket", socket, socket_place, keep)
        elif "socket" not in item and shared_dir is not None and tag is not None and keep:
            socket = self._backend.default_socket(vm, tag)
            socket_place = f"{share.file}: {path} as its default socket"
            self._check_socket(share, None, socket, socket_place, keep)

        if len(self._problems) > problems_before or tag is None or socket is None:
            return None
        device_id_prefix = (
            DEFAULT_DEVICE_ID_PREFIX if self._watch is None else self._watch.device_id_prefix
        )
        return Share(
            vm=vm,
            tag=tag,
            socket=socket,
            num_queues=self._num_queues if num_queues is None else num_queues,
            queue_size=self._queue_size if queue_size is None else queue_size,
            device_id=device_id_prefix + tag,
            shared_dir=shared_dir,
            readonly=bool(readonly),
            cache="auto" if cache is None else cache,
        )

    def check_reserved_sockets(self) -> None:
        """Once every file is read (a drop-in's managed share has files too): no socket may be
        one of the daemon's own files, nor a configured VM's API socket.

        Only the state file's default path is known here; ``--state-file`` and
        ``$VIRTIOFS_REATTACH_STATE`` move it, and then it is the operator's choice of path.
        """
        own = {
            DEFAULT_STATE_PATH: "state file",
            posixpath.join(self._backend.runtime_dir, LOCK_NAME): "lock file",
        }
        for shares in self.shares.values():
            for managed in (share for share in shares if share.managed):
                # Named as backends_files.SharePaths names them (a test keeps the two in step).
                folder = posixpath.join(self._backend.runtime_dir, managed.vm)
                whose = f"of {managed.vm}'s managed share {_show(managed.tag)}"
                own[posixpath.join(folder, f"{managed.tag}.json")] = f"virtiofsd record {whose}"
                own[posixpath.join(folder, f"{managed.tag}.log")] = f"virtiofsd output FIFO {whose}"
        for share, key, socket in self._sockets:
            what = _show(socket) if key is not None else f"default socket {_show(socket)}"
            if socket in own:
                share.problem(
                    key,
                    f"{what} is the daemon's own {own[socket]} "
                    "(give the share a socket path of its own)",
                )
            owner = None if self._watch is None else self._watch.api_socket.vm_for(socket)
            if owner is not None and owner in self.shares:
                # The daemon would ping it as VM `owner`'s CH, and that ping would be the
                # one connection the virtiofsd there serves (virtiofsd.md §2).
                share.problem(
                    key,
                    f"{what} is where [watch] api_socket puts VM {_show(owner)}'s API socket "
                    "(give the share a socket outside that pattern)",
                )

    def _check_socket(
        self, share: _Table, key: str | None, socket: str, place: str, keep: bool
    ) -> None:
        """Length and uniqueness; ``key`` None means the socket is the managed default."""
        what = _show(socket) if key is not None else f"default socket {_show(socket)}"
        fix_default = "" if key is not None else "set socket, or "
        length = len(os.fsencode(socket))
        if length > SUN_PATH_MAX:
            share.problem(
                key,
                f"{what} is {length} bytes, over the {SUN_PATH_MAX}-byte limit of a unix socket "
                f"path ({fix_default}use a shorter path)",
            )
        if not keep:
            return
        self._sockets.append((share, key, socket))
        if socket in self._socket_users:
            share.problem(
                key,
                f"{what} is also used by {self._socket_users[socket]} (give each share its own "
                "virtiofsd socket: two devices on one socket can hang Cloud Hypervisor)",
            )
        else:
            self._socket_users[socket] = place
