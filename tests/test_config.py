"""mounts.toml and mounts.d/*.toml: schema, defaults, every problem message, drop-ins."""

import os
from pathlib import Path
from types import MappingProxyType

import pytest

from watcher import config as config_module
from watcher import statusfile
from watcher.apisocket import ApiSocketPattern
from watcher.backends_files import SharePaths
from watcher.config import (
    DEFAULT_CONFIG_PATH,
    MAX_CONFIG_BYTES,
    BackendSettings,
    Config,
    ConfigError,
    RetrySettings,
    Share,
    WatchSettings,
    load_config,
    parse_config,
)
from watcher.daemonlock import lock_path

EXAMPLE = Path(__file__).resolve().parent.parent / "config" / "mounts.toml"

WATCH = '[watch]\napi_socket = "/run/ch/{vm}.sock"\n'
NOT_NORMALISED = "(remove empty, '.' and '..' components and any trailing slash)"
SOCKET_CLASH = (
    "(give each share its own virtiofsd socket: "
    "two devices on one socket can hang Cloud Hypervisor)"
)


def parse(main: str, *drop_ins: tuple[str, str]) -> Config:
    files = [("mounts.toml", main.encode()), *((n, t.encode()) for n, t in drop_ins)]
    return parse_config(files)


def problems(main: str, *drop_ins: tuple[str, str]) -> tuple[str, ...]:
    with pytest.raises(ConfigError) as caught:
        parse(main, *drop_ins)
    return caught.value.problems


def one_problem(main: str, *drop_ins: tuple[str, str]) -> str:
    found = problems(main, *drop_ins)
    assert len(found) == 1, found
    return found[0]


def with_share(share: str, vm: str = "web01") -> str:
    return f"{WATCH}[vm.{vm}]\nfs = [ {share} ]\n"


# --- what a valid file turns into -------------------------------------------------


def test_minimal_file_gets_every_default() -> None:
    config = parse(WATCH)
    assert config == Config(
        files=("mounts.toml",),
        watch=WatchSettings(
            api_socket=ApiSocketPattern.parse("/run/ch/{vm}.sock"),
            device_id_prefix="cocoon-fs-",
            prune=False,
        ),
        retry=RetrySettings(initial_delay=0.2, max_delay=30.0, give_up_after=0.0),
        backend=BackendSettings(
            virtiofsd=None, extra_args=(), runtime_dir="/run/virtiofs-reattach", start="always"
        ),
        vms={},
    )


def test_every_key_is_read() -> None:
    config = parse(
        """
[watch]
api_socket = "/var/lib/cocoon/run/cloudhypervisor/{vm}/api.sock"
device_id_prefix = "vfs-"
prune = true

[defaults]
num_queues = 2
queue_size = 256

[retry]
initial_delay = 1
max_delay = 2.5
give_up_after = 600
resync = 15

[backend]
virtiofsd = "/opt/bin/virtiofsd"
extra_args = ["--thread-pool-size=4", "--xattr"]
runtime_dir = "/run/vfs"
start = "on-demand"

[vm.web01]
fs = [
  { tag = "data", socket = "/run/virtiofsd/web01-data.sock" },
  { tag = "logs", socket = "/run/virtiofsd/web01-logs.sock", queue_size = 512, num_queues = 4 },
  { tag = "home", shared_dir = "/srv/web01/home", readonly = true, cache = "never" },
]

[vm."db.01"]

[vm.empty]
fs = []
"""
    )
    assert config.watch == WatchSettings(
        ApiSocketPattern.parse("/var/lib/cocoon/run/cloudhypervisor/{vm}/api.sock"), "vfs-", True
    )
    assert config.retry == RetrySettings(1.0, 2.5, 600.0, 15.0)
    assert isinstance(config.retry.initial_delay, float)
    assert config.backend == BackendSettings(
        "/opt/bin/virtiofsd", ("--thread-pool-size=4", "--xattr"), "/run/vfs", "on-demand"
    )
    assert config.vms == {
        "web01": (
            Share("web01", "data", "/run/virtiofsd/web01-data.sock", 2, 256, "vfs-data"),
            Share("web01", "logs", "/run/virtiofsd/web01-logs.sock", 4, 512, "vfs-logs"),
            Share(
                "web01",
                "home",
                "/run/vfs/web01/home.sock",
                2,
                256,
                "vfs-home",
                shared_dir="/srv/web01/home",
                readonly=True,
                cache="never",
            ),
        ),
        "db.01": (),
        "empty": (),
    }
    assert list(config.vms) == ["web01", "db.01", "empty"]
    assert [share.managed for share in config.vms["web01"]] == [False, False, True]


def test_managed_share_defaults() -> None:
    share = parse(with_share('{ tag = "home", shared_dir = "/srv/home/" }')).vms["web01"][0]
    assert share == Share(
        vm="web01",
        tag="home",
        socket="/run/virtiofs-reattach/web01/home.sock",
        num_queues=1,
        queue_size=1024,
        device_id="cocoon-fs-home",
        shared_dir="/srv/home/",
        readonly=False,
        cache="auto",
    )
    assert share.managed


def test_managed_share_keeps_an_explicit_socket() -> None:
    config = parse(with_share('{ tag = "home", shared_dir = "/srv/home", socket = "/run/h.sock" }'))
    assert config.vms["web01"][0].socket == "/run/h.sock"
    assert config.vms["web01"][0].managed


def test_empty_device_id_prefix_gives_bare_tags() -> None:
    config = parse(
        '[watch]\napi_socket = "/run/ch/{vm}.sock"\ndevice_id_prefix = ""\n'
        '[vm.web01]\nfs = [{ tag = "data", socket = "/run/d.sock" }]\n'
    )
    assert config.vms["web01"][0].device_id == "data"


def test_toml_1_1_multi_line_inline_table_with_trailing_comma() -> None:
    config = parse(
        WATCH
        + """[vm.web01]
fs = [
  {
    tag = "data",
    socket = "/run/d.sock",
  },
]
"""
    )
    assert config.vms["web01"][0].socket == "/run/d.sock"


def test_array_of_tables_syntax_works_too() -> None:
    config = parse(WATCH + '[[vm.web01.fs]]\ntag = "data"\nsocket = "/run/d.sock"\n')
    assert config.vms["web01"][0].tag == "data"


def test_configs_compare_equal_when_the_content_is_the_same() -> None:
    text = with_share('{ tag = "data", socket = "/run/d.sock" }')
    assert parse(text) == parse(text)
    assert parse(text) != parse(text.replace("/run/d.sock", "/run/e.sock"))
    assert isinstance(parse(text).vms, MappingProxyType)


def test_the_shipped_example_loads() -> None:
    config = load_config(str(EXAMPLE))
    assert config.files == (str(EXAMPLE),)
    assert config.watch.api_socket.template == "/run/cloud-hypervisor/{vm}.sock"
    assert [(s.tag, s.socket, s.queue_size) for s in config.vms["web01"]] == [
        ("data", "/run/virtiofsd/web01-data.sock", 1024),
        ("logs", "/run/virtiofsd/web01-logs.sock", 512),
    ]
    assert not any(share.managed for share in config.vms["web01"])


def test_the_shipped_example_documents_every_key() -> None:
    text = EXAMPLE.read_text()
    for key in [
        "api_socket",
        "device_id_prefix",
        "prune",
        "num_queues",
        "queue_size",
        "initial_delay",
        "max_delay",
        "give_up_after",
        "resync",
        "virtiofsd",
        "extra_args",
        "runtime_dir",
        "start",
        "tag",
        "socket",
        "shared_dir",
        "readonly",
        "cache",
        "/var/lib/cocoon/run/cloudhypervisor/{vm}/api.sock",
        "cocoon vm fs detach --tag",
    ]:
        assert key in text, key


def test_default_config_path() -> None:
    assert DEFAULT_CONFIG_PATH == "/etc/virtiofs-reattach/mounts.toml"


# --- reporting --------------------------------------------------------------------


def test_all_problems_are_reported_at_once() -> None:
    found = problems(
        """
[watch]
api_socket = "/run/ch/{vm}.sock"
prune = "yes"

[defaults]
queue_size = 1000

[vm.web01]
fs = [{ tag = "my tag", socket = "/run/d.sock" }]
"""
    )
    assert found == (
        'mounts.toml: watch.prune: expected a boolean, got "yes" '
        "(write true or false without quotes)",
        "mounts.toml: defaults.queue_size: 1000 is not a power of two from 1 to 32768 "
        "(Cloud Hypervisor accepts only those; e.g. 1024)",
        'mounts.toml: vm.web01.fs[0].tag: "my tag" is not a valid tag '
        "(use 1-36 letters, digits, '_' or '-', starting with a letter or digit)",
    )


def test_error_text_is_the_problem_lines() -> None:
    with pytest.raises(ConfigError) as caught:
        parse("[watch]\nprune = 1\nextra = 2\n")
    assert str(caught.value) == "\n".join(caught.value.problems)
    assert len(caught.value.problems) == 3


def test_syntax_error_has_line_and_column() -> None:
    assert one_problem('[watch]\napi_socket = "/run/ch/{vm}.sock"\nprune = yes\n') == (
        "mounts.toml:3:9: Invalid value"
    )


def test_syntax_error_in_a_drop_in_does_not_hide_the_main_file_problems() -> None:
    found = problems("[watch]\n", ("mounts.d/10-a.toml", "[vm.a]\nfs = [\n"))
    assert found == (
        "mounts.d/10-a.toml:3:1: Invalid value",
        "mounts.toml: watch.api_socket: missing (set it to where the VMs' API sockets appear, "
        'with {vm} standing for the VM name, e.g. "/run/cloud-hypervisor/{vm}.sock")',
    )


def test_invalid_utf8_has_line_and_column() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config([("mounts.toml", b'[watch]\napi_socket = "/r\xc3\xa9\xff"\n')])
    assert caught.value.problems == (  # the column counts characters: "é" is one
        "mounts.toml:2:18: invalid UTF-8 (TOML files must be UTF-8)",
    )


def test_a_utf8_byte_order_mark_is_ignored() -> None:
    bom = b"\xef\xbb\xbf"
    config = parse_config(
        [("mounts.toml", bom + WATCH.encode()), ("mounts.d/a.toml", bom + b"[vm.a]\n")]
    )
    assert config == parse(WATCH, ("mounts.d/a.toml", "[vm.a]\n"))


def test_columns_after_a_byte_order_mark_are_what_the_editor_shows() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config([("mounts.toml", b"\xef\xbb\xbfprune = yes\n")])
    assert caught.value.problems == ("mounts.toml:1:9: Invalid value",)


def test_parse_config_needs_the_main_file() -> None:
    with pytest.raises(ValueError, match="at least the main file"):
        parse_config([])


# --- [watch] ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "",
            "mounts.toml: watch: missing (add a [watch] section with "
            'api_socket = "/run/cloud-hypervisor/{vm}.sock")',
        ),
        (
            'watch = "x"',
            'mounts.toml: watch: expected a table, got "x" (write it as a [watch] section)',
        ),
        (
            "[watch]",
            "mounts.toml: watch.api_socket: missing (set it to where the VMs' API sockets "
            'appear, with {vm} standing for the VM name, e.g. "/run/cloud-hypervisor/{vm}.sock")',
        ),
        (
            "[watch]\napi_socket = 5",
            "mounts.toml: watch.api_socket: expected a string, got 5 "
            "(put the value in double quotes)",
        ),
        (
            '[watch]\napi_socket = "/run/ch.sock"',
            'mounts.toml: watch.api_socket: "/run/ch.sock" has no {vm} placeholder '
            '(put {vm} where the VM name appears, e.g. "/run/cloud-hypervisor/{vm}.sock")',
        ),
        (
            '[watch]\napi_socket = "/run//{vm}.sock"',
            f'mounts.toml: watch.api_socket: "/run//{{vm}}.sock" is not a normalised path '
            f"{NOT_NORMALISED}",
        ),
        (
            f'{WATCH}device_id_prefix = "__x"',
            'mounts.toml: watch.device_id_prefix: "__x" is not a valid device id prefix '
            "(use up to 32 letters, digits, '_', '.' or '-', starting with a letter or digit, "
            'or ""; Cloud Hypervisor rejects ids starting with "__")',
        ),
        (
            f'{WATCH}device_id_prefix = "{"p" * 33}"',
            f'mounts.toml: watch.device_id_prefix: "{"p" * 33}" is not a valid device id prefix '
            "(use up to 32 letters, digits, '_', '.' or '-', starting with a letter or digit, "
            'or ""; Cloud Hypervisor rejects ids starting with "__")',
        ),
        (
            f"{WATCH}device_id_prefix = 1",
            "mounts.toml: watch.device_id_prefix: expected a string, got 1 "
            "(put the value in double quotes)",
        ),
        (
            f'{WATCH}device_id_prefix = ""\nprune = true',
            "mounts.toml: watch.prune: true needs a non-empty device_id_prefix "
            "(only ids carrying the prefix are pruned, "
            'and with "" our devices cannot be told apart from ones attached by others)',
        ),
        (
            f"{WATCH}prune = 1",
            "mounts.toml: watch.prune: expected a boolean, got 1 "
            "(write true or false without quotes)",
        ),
        (
            f"{WATCH}api-socket = 1",
            "mounts.toml: watch.api-socket: unknown key; did you mean 'api_socket'?",
        ),
        (
            f"{WATCH}zzz = 1",
            "mounts.toml: watch.zzz: unknown key "
            "(remove it; allowed here: api_socket, device_id_prefix, prune)",
        ),
        (
            f"{WATCH}[wacth]",
            "mounts.toml: wacth: unknown key; did you mean 'watch'?",
        ),
        (
            f'"my key" = 1\n{WATCH}',
            'mounts.toml: "my key": unknown key '
            "(remove it; allowed here: watch, defaults, retry, backend, vm)",
        ),
    ],
)
def test_watch_problems(text: str, message: str) -> None:
    assert one_problem(text + "\n") == message


@pytest.mark.parametrize("prefix", ["", "a", "cocoon-fs-", "x.y_z-", "p" * 32])
def test_valid_device_id_prefixes(prefix: str) -> None:
    assert parse(f'{WATCH}device_id_prefix = "{prefix}"\n').watch.device_id_prefix == prefix


# --- [defaults] and per-share queue settings -----------------------------------------


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("num_queues = 0", "0 is less than 1 (use 1 or more)"),
        (
            "num_queues = 2047",
            "2047 is more than 2046, the most a Cloud Hypervisor device can have "
            "(use at most the VM's number of boot vCPUs, which CH also requires; e.g. 1)",
        ),
        (
            "num_queues = 99999999999999999999",
            "99999999999999999999 is more than 2046, the most a Cloud Hypervisor device can have "
            "(use at most the VM's number of boot vCPUs, which CH also requires; e.g. 1)",
        ),
        ("num_queues = 1.0", "expected an integer, got 1.0 (write a whole number without quotes)"),
        (
            "num_queues = true",
            "expected an integer, got true (write a whole number without quotes)",
        ),
        (
            "queue_size = 0",
            "0 is not a power of two from 1 to 32768 "
            "(Cloud Hypervisor accepts only those; e.g. 1024)",
        ),
        (
            "queue_size = 65536",
            "65536 is not a power of two from 1 to 32768 "
            "(Cloud Hypervisor accepts only those; e.g. 1024)",
        ),
        (
            "queue_size = -2",
            "-2 is not a power of two from 1 to 32768 "
            "(Cloud Hypervisor accepts only those; e.g. 1024)",
        ),
        (
            'queue_size = "1024"',
            'expected an integer, got "1024" (write a whole number without quotes)',
        ),
    ],
)
def test_queue_problems_in_defaults_and_shares(setting: str, message: str) -> None:
    key = setting.split(" ")[0]
    assert (
        one_problem(f"{WATCH}[defaults]\n{setting}\n") == f"mounts.toml: defaults.{key}: {message}"
    )
    share = f'{{ tag = "data", socket = "/run/d.sock", {setting} }}'
    assert one_problem(with_share(share)) == f"mounts.toml: vm.web01.fs[0].{key}: {message}"


@pytest.mark.parametrize("size", [1, 2, 256, 32768])
def test_valid_queue_sizes(size: int) -> None:
    assert parse(f"{WATCH}[defaults]\nqueue_size = {size}\n") == parse(WATCH)  # no VM, no effect
    share = f'{{ tag = "data", socket = "/run/d.sock", queue_size = {size} }}'
    assert parse(with_share(share)).vms["web01"][0].queue_size == size


@pytest.mark.parametrize("count", [1, 2046])
def test_valid_num_queues(count: int) -> None:
    assert parse(f"{WATCH}[defaults]\nnum_queues = {count}\n") == parse(WATCH)
    share = f'{{ tag = "data", socket = "/run/d.sock", num_queues = {count} }}'
    assert parse(with_share(share)).vms["web01"][0].num_queues == count


def test_share_settings_override_defaults() -> None:
    config = parse(
        f"{WATCH}[defaults]\nnum_queues = 2\nqueue_size = 128\n"
        "[vm.web01]\nfs = [\n"
        '  { tag = "a", socket = "/run/a.sock" },\n'
        '  { tag = "b", socket = "/run/b.sock", num_queues = 3, queue_size = 64 },\n'
        "]\n"
    )
    assert [(s.num_queues, s.queue_size) for s in config.vms["web01"]] == [(2, 128), (3, 64)]


def test_defaults_unknown_key() -> None:
    assert one_problem(f"{WATCH}[defaults]\nqueue_sise = 1\n") == (
        "mounts.toml: defaults.queue_sise: unknown key; did you mean 'queue_size'?"
    )


# --- [retry] ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        (
            "initial_delay = 0",
            "retry.initial_delay: 0 is not more than 0 "
            "(use a positive number of seconds, e.g. 0.2)",
        ),
        (
            "initial_delay = -0.5",
            "retry.initial_delay: -0.5 is not more than 0 "
            "(use a positive number of seconds, e.g. 0.2)",
        ),
        (
            "max_delay = 0.1",
            "retry.max_delay: 0.1 is less than initial_delay 0.2 "
            "(raise max_delay or lower initial_delay)",
        ),
        (
            "initial_delay = 5\nmax_delay = 4",
            "retry.max_delay: 4 is less than initial_delay 5 "
            "(raise max_delay or lower initial_delay)",
        ),
        (
            "give_up_after = -1",
            "retry.give_up_after: -1 is negative "
            "(use 0 to keep trying while the VM's API socket is live, or a number of seconds)",
        ),
        (
            "resync = -5",
            "retry.resync: -5 is negative "
            "(use a number of seconds, or 0 to look at running VMs only when something changes)",
        ),
        (
            "give_up_after = inf",
            "retry.give_up_after: expected a number of seconds, got inf "
            "(write a number without quotes, e.g. 0.5)",
        ),
        (
            "max_delay = nan",
            "retry.max_delay: expected a number of seconds, got nan "
            "(write a number without quotes, e.g. 0.5)",
        ),
        (
            "initial_delay = false",
            "retry.initial_delay: expected a number of seconds, got false "
            "(write a number without quotes, e.g. 0.5)",
        ),
        (
            'max_delay = "30s"',
            'retry.max_delay: expected a number of seconds, got "30s" '
            "(write a number without quotes, e.g. 0.5)",
        ),
        ("delay = 1", "retry.delay: unknown key; did you mean 'max_delay'?"),
    ],
)
def test_retry_problems(setting: str, message: str) -> None:
    assert one_problem(f"{WATCH}[retry]\n{setting}\n") == f"mounts.toml: {message}"


def test_invalid_initial_delay_is_not_compared_with_max_delay() -> None:
    assert one_problem(f"{WATCH}[retry]\ninitial_delay = 0\nmax_delay = 0.1\n").startswith(
        "mounts.toml: retry.initial_delay: 0 is not more than 0"
    )


def test_retry_accepts_equal_delays_and_zero_give_up() -> None:
    retry = parse(f"{WATCH}[retry]\ninitial_delay = 2\nmax_delay = 2\ngive_up_after = 0\n").retry
    assert retry == RetrySettings(2.0, 2.0, 0.0)


# --- [backend] ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        (
            'virtiofsd = "virtiofsd"',
            "backend.virtiofsd: \"virtiofsd\" is not an absolute path (start it with '/')",
        ),
        (
            'extra_args = "--xattr"',
            'backend.extra_args: expected an array, got "--xattr" (write it as ["--flag", ...])',
        ),
        (
            'extra_args = ["--xattr", 4]',
            "backend.extra_args[1]: expected a string, got 4 (put the value in double quotes)",
        ),
        (
            r'extra_args = ["--xattr", "--log-level=de\u0000bug"]',
            r'backend.extra_args[1]: "--log-level=de\u0000bug" contains a NUL character '
            "(remove it; a program argument cannot hold one)",
        ),
        (
            'runtime_dir = "/run/vfs/"',
            f'backend.runtime_dir: "/run/vfs/" is not a normalised path {NOT_NORMALISED}',
        ),
        (
            'runtime_dir = "run/vfs"',
            "backend.runtime_dir: \"run/vfs\" is not an absolute path (start it with '/')",
        ),
        (
            'start = "lazy"',
            'backend.start: "lazy" is not a start mode (use "always" or "on-demand")',
        ),
        (
            "start = true",
            "backend.start: expected a string, got true (put the value in double quotes)",
        ),
        ("virtiofs = 1", "backend.virtiofs: unknown key; did you mean 'virtiofsd'?"),
    ],
)
def test_backend_problems(setting: str, message: str) -> None:
    assert one_problem(f"{WATCH}[backend]\n{setting}\n") == f"mounts.toml: {message}"


def test_backend_virtiofsd_need_not_be_normalised() -> None:
    backend = parse(f'{WATCH}[backend]\nvirtiofsd = "/opt//virtiofsd"\n').backend
    assert backend.virtiofsd == "/opt//virtiofsd"


@pytest.mark.parametrize(
    ("document", "key_path"),  # "@" marks where the control character goes
    [
        ('[watch]\napi_socket = "/run/ch/{vm}@.sock"\n', "watch.api_socket"),
        (f'{WATCH}[backend]\nvirtiofsd = "/usr/bin/virtiofsd@"\n', "backend.virtiofsd"),
        (f'{WATCH}[backend]\nruntime_dir = "/run/vfs@"\n', "backend.runtime_dir"),
        (with_share('{ tag = "data", socket = "/x/da@ta.sock" }'), "vm.web01.fs[0].socket"),
        (with_share('{ tag = "data", shared_dir = "/srv/da@ta" }'), "vm.web01.fs[0].shared_dir"),
    ],
)
@pytest.mark.parametrize(
    ("escape", "code"), [("\\u0000", "U+0000"), ("\\n", "U+000A"), ("\\u007f", "U+007F")]
)
def test_control_characters_in_paths_are_refused(
    document: str, key_path: str, escape: str, code: str
) -> None:
    """A NUL would pass ``check`` and crash the daemon on first use ("embedded null byte")."""
    problem = one_problem(document.replace("@", escape))
    assert problem.startswith(f"mounts.toml: {key_path}: "), problem
    assert escape in problem  # shown as written in the file, so it can be found
    assert problem.endswith(
        f"contains the control character {code} (remove it; in a double-quoted TOML string "
        "a backslash starts an escape, so write \\\\ for a backslash or use single quotes)"
    )


# --- [vm.*] and shares --------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            '[vm."my vm"]',
            'mounts.toml: vm."my vm": "my vm" is not a valid VM name '
            "(use 1-63 letters, digits, '.', '_' or '-', starting with a letter or digit)",
        ),
        (
            '[vm.".."]',
            'mounts.toml: vm."..": ".." is not a valid VM name '
            "(use 1-63 letters, digits, '.', '_' or '-', starting with a letter or digit)",
        ),
        (
            f"[vm.{'v' * 64}]",
            f'mounts.toml: vm.{"v" * 64}: "{"v" * 64}" is not a valid VM name '
            "(use 1-63 letters, digits, '.', '_' or '-', starting with a letter or digit)",
        ),
        (
            'vm = "web01"',
            'mounts.toml: vm: expected a table, got "web01" (write each VM as a [vm.NAME] section)',
        ),
        (
            "vm.web01 = 1",
            "mounts.toml: vm.web01: expected a table, got 1 "
            "(write it as a [vm.NAME] section with fs = [ ... ])",
        ),
        (
            '[vm."web.01"]\nfs = {}',
            'mounts.toml: vm."web.01".fs: expected an array, got a table (write it as fs = '
            '[ { tag = "data", socket = "/run/virtiofsd/data.sock" } ])',
        ),
        (
            "[vm.web01]\nfs = [1]",
            "mounts.toml: vm.web01.fs[0]: expected a table, got 1 (write each share as "
            '{ tag = "data", socket = "/run/virtiofsd/data.sock" })',
        ),
        (
            "[vm.web01]\nshares = []",
            "mounts.toml: vm.web01.shares: unknown key (remove it; allowed here: fs)",
        ),
    ],
)
def test_vm_problems(text: str, message: str) -> None:
    assert one_problem(f"{text}\n{WATCH}") == message


def test_vm_names_with_dots_are_quoted_in_key_paths() -> None:
    share = '{ tag = "bad tag", socket = "/run/d.sock" }'
    assert one_problem(with_share(share, vm='"web.01"')).startswith(
        'mounts.toml: vm."web.01".fs[0].tag: "bad tag" is not a valid tag'
    )


def test_vm_name_of_63_characters_is_valid() -> None:
    name = "v" * 63
    assert list(parse(f"{WATCH}[vm.{name}]\n").vms) == [name]


def test_api_socket_path_is_checked_against_the_unix_socket_limit() -> None:
    directory = "/run/" + "d" * 90  # 95 bytes + "/" + name + ".sock"
    text = f'[watch]\napi_socket = "{directory}/{{vm}}.sock"\n[vm.abcdef]\n[vm.abcdefg]\n'
    path = f"{directory}/abcdefg.sock"
    assert len(path) == 108
    assert one_problem(text) == (
        f'mounts.toml: vm.abcdefg: its API socket "{path}" is 108 bytes, over the 107-byte '
        "limit of a unix socket path (use a shorter VM name or watch.api_socket)"
    )


@pytest.mark.parametrize(
    ("share", "message"),
    [
        (
            '{ socket = "/run/d.sock" }',
            'vm.web01.fs[0].tag: missing (set the mount tag the guest mounts, e.g. tag = "data")',
        ),
        (
            '{ tag = 5, socket = "/run/d.sock" }',
            "vm.web01.fs[0].tag: expected a string, got 5 (put the value in double quotes)",
        ),
        (
            f'{{ tag = "{"t" * 37}", socket = "/run/d.sock" }}',
            f'vm.web01.fs[0].tag: "{"t" * 37}" is not a valid tag '
            "(use 1-36 letters, digits, '_' or '-', starting with a letter or digit)",
        ),
        (
            '{ tag = "a.b", socket = "/run/d.sock" }',
            'vm.web01.fs[0].tag: "a.b" is not a valid tag '
            "(use 1-36 letters, digits, '_' or '-', starting with a letter or digit)",
        ),
        (
            '{ tag = "data" }',
            "vm.web01.fs[0]: needs socket or shared_dir (set socket to use a virtiofsd you run, "
            "or shared_dir to have the daemon run one)",
        ),
        (
            '{ tag = "data", socket = "d.sock" }',
            "vm.web01.fs[0].socket: \"d.sock\" is not an absolute path (start it with '/')",
        ),
        (
            '{ tag = "data", socket = "/run/./d.sock" }',
            f'vm.web01.fs[0].socket: "/run/./d.sock" is not a normalised path {NOT_NORMALISED}',
        ),
        (
            f'{{ tag = "data", socket = "/{"s" * 102}.sock" }}',
            f'vm.web01.fs[0].socket: "/{"s" * 102}.sock" is 108 bytes, over the 107-byte limit '
            "of a unix socket path (use a shorter path)",
        ),
        (
            '{ tag = "data", shared_dir = "srv/data" }',
            "vm.web01.fs[0].shared_dir: \"srv/data\" is not an absolute path (start it with '/')",
        ),
        (
            '{ tag = "data", socket = "/run/d.sock", readonly = true }',
            "vm.web01.fs[0].readonly: only applies to a managed share (add shared_dir, or "
            "remove it: a virtiofsd you run yourself takes its own flags)",
        ),
        (
            '{ tag = "data", socket = "/run/d.sock", cache = "never" }',
            "vm.web01.fs[0].cache: only applies to a managed share (add shared_dir, or "
            "remove it: a virtiofsd you run yourself takes its own flags)",
        ),
        (
            '{ tag = "data", shared_dir = "/srv", cache = "none" }',
            'vm.web01.fs[0].cache: "none" is not a cache mode '
            '(use one of "auto", "always", "never", "metadata")',
        ),
        (
            '{ tag = "data", shared_dir = "/srv", readonly = "yes" }',
            'vm.web01.fs[0].readonly: expected a boolean, got "yes" '
            "(write true or false without quotes)",
        ),
        (
            '{ tag = "data", socket = "/run/d.sock", sharedir = "/srv" }',
            "vm.web01.fs[0].sharedir: unknown key; did you mean 'shared_dir'?",
        ),
        (
            '{ tag = "data", socket = "/run/d.sock", path = "/srv" }',
            "vm.web01.fs[0].path: unknown key (remove it; allowed here: tag, socket, "
            "shared_dir, readonly, cache, num_queues, queue_size)",
        ),
    ],
)
def test_share_problems(share: str, message: str) -> None:
    assert one_problem(with_share(share)) == f"mounts.toml: {message}"


def test_socket_of_107_bytes_is_accepted() -> None:
    socket = f"/{'s' * 101}.sock"
    assert len(socket) == 107
    share = f'{{ tag = "data", socket = "{socket}" }}'
    assert parse(with_share(share)).vms["web01"][0].socket == socket


def test_socket_length_counts_utf8_bytes() -> None:
    socket = f"/{'é' * 51}.sock"  # 52 characters, 108 bytes
    assert one_problem(with_share(f'{{ tag = "data", socket = "{socket}" }}')).startswith(
        f'mounts.toml: vm.web01.fs[0].socket: "{socket}" is 108 bytes'
    )


def test_default_managed_socket_is_checked_against_the_limit() -> None:
    runtime_dir = "/" + "r" * 91
    text = f'{WATCH}[backend]\nruntime_dir = "{runtime_dir}"\n' + (
        '[vm.web01]\nfs = [{ tag = "home", shared_dir = "/srv" }]\n'
    )
    socket = f"{runtime_dir}/web01/home.sock"
    assert one_problem(text) == (
        f'mounts.toml: vm.web01.fs[0]: default socket "{socket}" is {len(socket)} bytes, '
        "over the 107-byte limit of a unix socket path (set socket, or use a shorter path)"
    )


def test_duplicate_tag_in_one_vm() -> None:
    text = (
        f"{WATCH}[vm.web01]\nfs = [\n"
        '  { tag = "data", socket = "/run/a.sock" },\n'
        '  { tag = "data", socket = "/run/b.sock" },\n'
        "]\n[vm.web02]\n"
        'fs = [{ tag = "data", socket = "/run/c.sock" }]\n'
    )
    assert one_problem(text) == (
        'mounts.toml: vm.web01.fs[1].tag: "data" is already the tag of vm.web01.fs[0] '
        "(give each share of a VM its own tag)"
    )


def test_socket_used_twice_in_one_vm() -> None:
    text = with_share(
        '{ tag = "a", socket = "/run/d.sock" }, { tag = "b", socket = "/run/d.sock" }'
    )
    assert one_problem(text) == (
        'mounts.toml: vm.web01.fs[1].socket: "/run/d.sock" is also used by '
        f"mounts.toml: vm.web01.fs[0].socket {SOCKET_CLASH}"
    )


def test_socket_used_by_two_vms() -> None:
    text = (
        f'{WATCH}[vm.web01]\nfs = [{{ tag = "a", socket = "/run/d.sock" }}]\n'
        '[vm.web02]\nfs = [{ tag = "a", socket = "/run/d.sock" }]\n'
    )
    assert one_problem(text) == (
        'mounts.toml: vm.web02.fs[0].socket: "/run/d.sock" is also used by '
        f"mounts.toml: vm.web01.fs[0].socket {SOCKET_CLASH}"
    )


def test_explicit_socket_clashing_with_a_managed_default() -> None:
    text = (
        f'{WATCH}[vm.web01]\nfs = [{{ tag = "home", shared_dir = "/srv" }}]\n'
        '[vm.web02]\nfs = [{ tag = "x", socket = "/run/virtiofs-reattach/web01/home.sock" }]\n'
    )
    assert one_problem(text) == (
        'mounts.toml: vm.web02.fs[0].socket: "/run/virtiofs-reattach/web01/home.sock" is also '
        f"used by mounts.toml: vm.web01.fs[0] as its default socket {SOCKET_CLASH}"
    )


def test_managed_default_clashing_with_an_explicit_socket() -> None:
    text = (
        f"{WATCH}[vm.web02]\n"
        'fs = [{ tag = "x", socket = "/run/virtiofs-reattach/web01/home.sock" }]\n'
        '[vm.web01]\nfs = [{ tag = "home", shared_dir = "/srv" }]\n'
    )
    assert one_problem(text) == (
        'mounts.toml: vm.web01.fs[0]: default socket "/run/virtiofs-reattach/web01/home.sock" '
        f"is also used by mounts.toml: vm.web02.fs[0].socket {SOCKET_CLASH}"
    )


OWN_FILE_FIX = "(give the share a socket path of its own)"


@pytest.mark.parametrize("kind", ["registry", "fifo"])
def test_socket_on_a_managed_share_s_own_file_is_refused(kind: str) -> None:
    home = SharePaths.of("/run/virtiofs-reattach", "web01", "home", "unused")
    own = getattr(home, kind)  # the very paths the supervisor writes
    what = "record" if kind == "registry" else "output FIFO"
    text = (
        f'{WATCH}[vm.web01]\nfs = [{{ tag = "home", shared_dir = "/srv" }}]\n'
        f'[vm.web02]\nfs = [{{ tag = "x", socket = "{own}" }}]\n'
    )
    assert one_problem(text) == (
        f'mounts.toml: vm.web02.fs[0].socket: "{own}" is the daemon\'s own virtiofsd {what} '
        f'of web01\'s managed share "home" {OWN_FILE_FIX}'
    )


def test_a_managed_share_may_not_listen_on_its_own_record() -> None:
    own = "/run/virtiofs-reattach/web01/home.json"
    text = with_share(f'{{ tag = "home", shared_dir = "/srv", socket = "{own}" }}')
    assert one_problem(text) == (
        f'mounts.toml: vm.web01.fs[0].socket: "{own}" is the daemon\'s own virtiofsd record '
        f'of web01\'s managed share "home" {OWN_FILE_FIX}'
    )


def test_a_drop_in_s_managed_share_protects_its_files_from_the_main_file() -> None:
    main = with_share('{ tag = "x", socket = "/run/virtiofs-reattach/db/home.log" }')
    drop_in = ("mounts.d/db.toml", '[vm.db]\nfs = [{ tag = "home", shared_dir = "/srv" }]\n')
    assert one_problem(main, drop_in) == (
        'mounts.toml: vm.web01.fs[0].socket: "/run/virtiofs-reattach/db/home.log" is the '
        f"daemon's own virtiofsd output FIFO of db's managed share \"home\" {OWN_FILE_FIX}"
    )


def test_socket_on_the_daemon_lock_or_state_file_is_refused() -> None:
    lock = lock_path("/run/vr")
    text = (
        f'{WATCH}[backend]\nruntime_dir = "/run/vr"\n[vm.web01]\nfs = [\n'
        f'  {{ tag = "a", socket = "{lock}" }},\n'
        f'  {{ tag = "b", shared_dir = "/srv", socket = "{statusfile.DEFAULT_PATH}" }},\n'
        "]\n"
    )
    assert problems(text) == (
        f'mounts.toml: vm.web01.fs[0].socket: "{lock}" is the daemon\'s own lock file '
        f"{OWN_FILE_FIX}",
        f'mounts.toml: vm.web01.fs[1].socket: "{statusfile.DEFAULT_PATH}" is the daemon\'s own '
        f"state file {OWN_FILE_FIX}",
    )


def test_other_files_in_the_runtime_dir_are_fine_as_sockets() -> None:
    text = (
        f'{WATCH}[vm.web01]\nfs = [{{ tag = "home", shared_dir = "/srv" }}, '
        '{ tag = "x", socket = "/run/virtiofs-reattach/web01/other.json" }, '
        '{ tag = "y", socket = "/run/virtiofs-reattach/.other.lock" }]\n'
    )
    assert [share.tag for share in parse(text).vms["web01"]] == ["home", "x", "y"]


# --- drop-ins, through parse_config -----------------------------------------------------


def test_drop_ins_merge_in_order() -> None:
    config = parse(
        with_share('{ tag = "a", socket = "/run/a.sock" }', vm="main"),
        ("mounts.d/10-b.toml", '[vm.b]\nfs = [{ tag = "a", socket = "/run/b.sock" }]\n'),
        ("mounts.d/20-a.toml", "[vm.a]\n"),
    )
    assert config.files == ("mounts.toml", "mounts.d/10-b.toml", "mounts.d/20-a.toml")
    assert list(config.vms) == ["main", "b", "a"]
    assert config.vms["b"][0].device_id == "cocoon-fs-a"


def test_vm_declared_in_two_files() -> None:
    found = problems(
        WATCH + '[vm.web01]\nfs = [{ tag = "a", socket = "/run/a.sock" }]\n',
        ("mounts.d/10-x.toml", '[vm.web01]\nfs = [{ tag = "a", socket = "/run/a.sock" }]\n'),
    )
    assert found == (
        "mounts.d/10-x.toml: vm.web01: already declared in mounts.toml "
        "(declare each VM in one file only)",
    )


def test_socket_used_in_two_files() -> None:
    found = problems(
        WATCH + '[vm.web01]\nfs = [{ tag = "a", socket = "/run/a.sock" }]\n',
        ("mounts.d/10-x.toml", '[vm.web02]\nfs = [{ tag = "a", socket = "/run/a.sock" }]\n'),
    )
    assert found == (
        'mounts.d/10-x.toml: vm.web02.fs[0].socket: "/run/a.sock" is also used by '
        f"mounts.toml: vm.web01.fs[0].socket {SOCKET_CLASH}",
    )


@pytest.mark.parametrize("section", ["watch", "defaults", "retry", "backend", "vms"])
def test_drop_in_may_only_declare_vms(section: str) -> None:
    found = problems(WATCH, ("mounts.d/10-x.toml", f"[{section}]\nx = 1\n[vm.web01]\n"))
    assert found == (
        f"mounts.d/10-x.toml: {section}: not allowed in a drop-in, only [vm.*] tables are "
        "(move it to the main file mounts.toml)",
    )


def test_drop_in_shares_are_validated() -> None:
    found = problems(WATCH, ("mounts.d/x.toml", '[vm.a]\nfs = [{ tag = "t", socket = "s" }]\n'))
    assert found == (
        "mounts.d/x.toml: vm.a.fs[0].socket: \"s\" is not an absolute path (start it with '/')",
    )


# --- load_config: files on disk ---------------------------------------------------------


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def write_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def test_load_reads_drop_ins_sorted_and_ignores_other_files(tmp_path: Path) -> None:
    main = write(tmp_path / "mounts.toml", WATCH + "[vm.main]\n")
    drop_ins = tmp_path / "mounts.d"
    write(drop_ins / "20-b.toml", "[vm.b]\n")
    write(drop_ins / "10-a.toml", "[vm.a]\n")
    write(drop_ins / "30-c.toml.disabled", "not toml at all [")
    write(drop_ins / "README", "not toml at all [")
    write(drop_ins / ".#40-d.toml", "not toml at all [")  # an editor's lock file
    config = load_config(str(main))
    assert config.files == (
        str(main),
        str(drop_ins / "10-a.toml"),
        str(drop_ins / "20-b.toml"),
    )
    assert list(config.vms) == ["main", "a", "b"]


def test_load_without_mounts_d(tmp_path: Path) -> None:
    main = write(tmp_path / "mounts.toml", WATCH)
    assert load_config(str(main)).files == (str(main),)


def test_load_names_files_as_the_caller_passed_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(tmp_path / "mounts.toml", WATCH + "[vm.web01]\n")
    write(tmp_path / "mounts.d" / "10-x.toml", "[vm.web01]\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as caught:
        load_config("mounts.toml")
    assert caught.value.problems == (
        "mounts.d/10-x.toml: vm.web01: already declared in mounts.toml "
        "(declare each VM in one file only)",
    )


def test_load_missing_main_file(tmp_path: Path) -> None:
    path = str(tmp_path / "mounts.toml")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.problems == (
        f"{path}: does not exist "
        "(create it; config/mounts.toml in the project is a commented example)",
    )


def load_problems(path: Path) -> tuple[str, ...]:
    with pytest.raises(ConfigError) as caught:
        load_config(str(path))
    return caught.value.problems


def test_load_main_file_that_is_a_directory(tmp_path: Path) -> None:
    path = tmp_path / "mounts.toml"
    path.mkdir()
    assert load_problems(path) == (f"{path}: is a directory (a config must be a plain file)",)


def test_load_main_file_that_cannot_be_read(tmp_path: Path) -> None:
    path = tmp_path / "mounts.toml"
    os.symlink(path, path)  # a loop: even root cannot open it
    assert load_problems(path) == (
        f"{path}: cannot be read: Too many levels of symbolic links "
        "(make it readable by the daemon or remove it)",
    )


def test_load_main_file_that_is_a_dangling_symlink(tmp_path: Path) -> None:
    path = tmp_path / "mounts.toml"
    os.symlink("real/mounts.toml", path)
    assert load_problems(path) == (
        f'{path}: is a symbolic link to "real/mounts.toml", which does not exist '
        "(create the target or point the link at the config file)",
    )


def test_load_follows_symlinks_to_regular_files(tmp_path: Path) -> None:
    main = tmp_path / "mounts.toml"
    os.symlink(write(tmp_path / "real" / "main.toml", WATCH), main)
    os.symlink(
        write(tmp_path / "real" / "a.toml", "[vm.a]\n"), write_dir(tmp_path / "mounts.d") / "a.toml"
    )
    config = load_config(str(main))
    assert config.files == (str(main), f"{tmp_path}/mounts.d/a.toml")
    assert list(config.vms) == ["a"]


@pytest.mark.timeout(10)  # without O_NONBLOCK, opening a FIFO waits for a writer forever
def test_load_refuses_a_fifo_as_the_main_file(tmp_path: Path) -> None:
    path = tmp_path / "mounts.toml"
    os.mkfifo(path)
    assert load_problems(path) == (
        f"{path}: is not a regular file (a config must be a plain file)",
    )


@pytest.mark.timeout(10)
def test_load_refuses_a_fifo_drop_in_with_the_other_problems(tmp_path: Path) -> None:
    main = write(tmp_path / "mounts.toml", WATCH + "prune = 1\n")
    os.mkfifo(write_dir(tmp_path / "mounts.d") / "zz.toml")
    assert load_problems(main) == (
        f"{tmp_path}/mounts.d/zz.toml: is not a regular file (a config must be a plain file)",
        f"{main}: watch.prune: expected a boolean, got 1 (write true or false without quotes)",
    )


def test_load_refuses_a_device(tmp_path: Path) -> None:
    # /dev/zero would exhaust memory; /dev/null shows the same rule without the risk.
    assert load_problems(Path("/dev/null")) == (
        "/dev/null: is not a regular file (a config must be a plain file)",
    )


def test_load_refuses_a_file_over_the_size_limit(tmp_path: Path) -> None:
    path = write(tmp_path / "mounts.toml", WATCH)
    os.truncate(path, MAX_CONFIG_BYTES + 1)  # sparse: no disk space used
    assert load_problems(path) == (
        f"{path}: is larger than 16 MiB (check that it is the intended file; "
        "spread a config this large over mounts.d/*.toml drop-ins)",
    )


def test_size_limit_is_inclusive(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path / "mounts.toml", WATCH)
    monkeypatch.setattr(config_module, "MAX_CONFIG_BYTES", len(WATCH))
    assert load_config(str(path)).files == (str(path),)
    monkeypatch.setattr(config_module, "MAX_CONFIG_BYTES", len(WATCH) - 1)
    assert load_problems(path)[0].startswith(f"{path}: is larger than ")


def test_load_unreadable_drop_in_is_reported_with_the_other_problems(tmp_path: Path) -> None:
    main = write(tmp_path / "mounts.toml", WATCH + "prune = 1\n")
    drop_ins = write_dir(tmp_path / "mounts.d")
    os.symlink(tmp_path / "nowhere.toml", drop_ins / "10-gone.toml")
    (drop_ins / "15-dir.toml").mkdir()
    write(drop_ins / "20-ok.toml", "[vm.ok]\n")
    assert load_problems(main) == (
        f'{drop_ins}/10-gone.toml: is a symbolic link to "{tmp_path}/nowhere.toml", '
        "which does not exist (create the target or point the link at the config file)",
        f"{drop_ins}/15-dir.toml: is a directory (a config must be a plain file)",
        f"{main}: watch.prune: expected a boolean, got 1 (write true or false without quotes)",
    )


def test_load_mounts_d_that_is_not_a_directory(tmp_path: Path) -> None:
    main = write(tmp_path / "mounts.toml", WATCH)
    write(tmp_path / "mounts.d", "")
    with pytest.raises(ConfigError) as caught:
        load_config(str(main))
    assert caught.value.problems == (
        f"{tmp_path}/mounts.d: cannot be listed: Not a directory (make it a readable directory)",
    )


def test_load_reports_problems_across_files(tmp_path: Path) -> None:
    main = write(tmp_path / "mounts.toml", WATCH + '[vm.a]\nfs = [{ tag = "t", socket = "/s" }]\n')
    write(tmp_path / "mounts.d" / "10-b.toml", '[vm.b]\nfs = [{ tag = "t", socket = "/s" }]\n')
    write(tmp_path / "mounts.d" / "20-c.toml", "[backend]\n")
    with pytest.raises(ConfigError) as caught:
        load_config(str(main))
    assert caught.value.problems == (
        f'{tmp_path}/mounts.d/10-b.toml: vm.b.fs[0].socket: "/s" is also used by '
        f"{main}: vm.a.fs[0].socket {SOCKET_CLASH}",
        f"{tmp_path}/mounts.d/20-c.toml: backend: not allowed in a drop-in, only [vm.*] tables "
        f"are (move it to the main file {main})",
    )


def test_socket_on_a_configured_vm_s_api_socket_is_refused() -> None:
    # The daemon would ping it as web02's CH: that ping would use up the virtiofsd's
    # one connection.
    text = (
        f'{WATCH}[vm.web01]\nfs = [{{ tag = "a", socket = "/run/ch/web02.sock" }}]\n'
        '[vm.web02]\nfs = [{ tag = "b", socket = "/run/vfs/web02-b.sock" }]\n'
    )
    assert one_problem(text) == (
        'mounts.toml: vm.web01.fs[0].socket: "/run/ch/web02.sock" is where [watch] api_socket '
        'puts VM "web02"\'s API socket (give the share a socket outside that pattern)'
    )


def test_socket_matching_the_api_pattern_of_no_configured_vm_is_fine() -> None:
    config = parse(with_share('{ tag = "a", socket = "/run/ch/web01-a.sock" }'))
    assert config.vms["web01"][0].socket == "/run/ch/web01-a.sock"


def test_a_huge_value_is_cut_in_the_message() -> None:
    (problem,) = problems(with_share(f'{{ tag = "{"x" * 100_000}", socket = "/run/a.sock" }}'))
    assert problem.startswith('mounts.toml: vm.web01.fs[0].tag: "xxx')
    assert '..." (cut) is not a valid tag' in problem
    assert len(problem) < 400
