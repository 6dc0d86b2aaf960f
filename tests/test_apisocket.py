"""The api_socket template: validation, and reading a VM name back from a path."""

import pytest

from watcher.apisocket import VM_NAME_RE, ApiSocketPattern, path_problem

FLAT = "/run/cloud-hypervisor/{vm}.sock"
COCOON = "/var/lib/cocoon/run/cloudhypervisor/{vm}/api.sock"


@pytest.mark.parametrize(
    ("template", "watch_root", "depth"),
    [
        (FLAT, "/run/cloud-hypervisor", 0),
        ("/run/ch/ch-{vm}.sock", "/run/ch", 0),
        ("/run/ch/{vm}", "/run/ch", 0),
        (COCOON, "/var/lib/cocoon/run/cloudhypervisor", 1),
        ("/srv/vms/{vm}/run/api.sock", "/srv/vms", 2),
        ("/{vm}.sock", "/", 0),
        ("/vm-{vm}/api.sock", "/", 1),
    ],
)
def test_watch_root_and_depth(template: str, watch_root: str, depth: int) -> None:
    pattern = ApiSocketPattern.parse(template)
    assert pattern.template == template
    assert pattern.watch_root == watch_root
    assert pattern.depth == depth


@pytest.mark.parametrize("template", [FLAT, COCOON, "/run/ch/ch-{vm}.sock", "/{vm}"])
@pytest.mark.parametrize("vm", ["web01", "a", "web.01", "web01.sock", "A-b_c.d", "x" * 63])
def test_path_for_and_vm_for_round_trip(template: str, vm: str) -> None:
    pattern = ApiSocketPattern.parse(template)
    path = pattern.path_for(vm)
    assert "{" not in path
    assert vm in path
    assert pattern.vm_for(path) == vm


def test_path_for_fills_in_the_name() -> None:
    assert ApiSocketPattern.parse(FLAT).path_for("web01") == "/run/cloud-hypervisor/web01.sock"
    assert (
        ApiSocketPattern.parse(COCOON).path_for("web01")
        == "/var/lib/cocoon/run/cloudhypervisor/web01/api.sock"
    )


@pytest.mark.parametrize(
    "path",
    [
        "/run/ch/web01.sock.lock",  # CH v53+ keeps <socket>.lock next to every socket
        "/run/ch/web01.lock",
        "/run/ch/.sock",  # empty name
        "/run/ch/..sock",  # name "."
        "/run/ch/...sock",  # name ".."
        "/run/ch/-web01.sock",  # must start with a letter or digit
        "/run/ch/web 01.sock",
        "/run/ch/" + "x" * 64 + ".sock",  # 64 characters
        "/run/ch/sub/web01.sock",  # one directory too deep
        "/run/other/web01.sock",
        "/run/ch",
        "/run/ch/",
        "",
        "/run/ch/web01.sock/",
    ],
)
def test_vm_for_rejects_paths_the_flat_pattern_does_not_give(path: str) -> None:
    assert ApiSocketPattern.parse("/run/ch/{vm}.sock").vm_for(path) is None


def test_vm_for_requires_the_whole_suffix() -> None:
    pattern = ApiSocketPattern.parse("/run/ch/{vm}.sock")
    assert pattern.vm_for("/run/ch/web01.sock.lock") is None
    assert pattern.vm_for("/run/ch/web01.sock.sock") == "web01.sock"


@pytest.mark.parametrize(
    "path",
    [
        "/d/web01/api.sock.lock",
        "/d/web01/other.sock",
        "/d/web01/x/api.sock",
        "/d/web01",
        "/d/./api.sock",
        "/d/../api.sock",
        "/d//api.sock",
        "/d/web01/api.sock/",
        "/e/web01/api.sock",
    ],
)
def test_vm_for_rejects_paths_the_nested_pattern_does_not_give(path: str) -> None:
    pattern = ApiSocketPattern.parse("/d/{vm}/api.sock")
    assert pattern.vm_for("/d/web01/api.sock") == "web01"
    assert pattern.vm_for(path) is None


def test_vm_for_with_prefix_in_the_component() -> None:
    pattern = ApiSocketPattern.parse("/run/ch/ch-{vm}.sock")
    assert pattern.vm_for("/run/ch/ch-web01.sock") == "web01"
    assert pattern.vm_for("/run/ch/web01.sock") is None
    assert pattern.vm_for("/run/ch/ch-.sock") is None
    assert pattern.vm_for("/run/ch/xch-web01.sock") is None


@pytest.mark.parametrize(
    ("template", "message"),
    [
        (
            "run/ch/{vm}.sock",
            "\"run/ch/{vm}.sock\" is not an absolute path (start it with '/')",
        ),
        (
            "/run//ch/{vm}.sock",
            '"/run//ch/{vm}.sock" is not a normalised path '
            "(remove empty, '.' and '..' components and any trailing slash)",
        ),
        (
            "/run/./ch/{vm}.sock",
            '"/run/./ch/{vm}.sock" is not a normalised path '
            "(remove empty, '.' and '..' components and any trailing slash)",
        ),
        (
            "/run/ch/../{vm}.sock",
            '"/run/ch/../{vm}.sock" is not a normalised path '
            "(remove empty, '.' and '..' components and any trailing slash)",
        ),
        (
            "/run/ch/{vm}/",
            '"/run/ch/{vm}/" is not a normalised path '
            "(remove empty, '.' and '..' components and any trailing slash)",
        ),
        (
            "/run/ch/api.sock",
            '"/run/ch/api.sock" has no {vm} placeholder (put {vm} where the VM name appears, '
            'e.g. "/run/cloud-hypervisor/{vm}.sock")',
        ),
        (
            "/run/{vm}/{vm}.sock",
            '"/run/{vm}/{vm}.sock" has {vm} more than once '
            "(use it exactly once: the VM name is read back from that one place)",
        ),
        (
            "/run/{vm}/{name}.sock",
            "\"/run/{vm}/{name}.sock\" has '{' or '}' outside the {vm} placeholder "
            "(only {vm} is supported)",
        ),
        (
            "/run/{v/m}/{vm}.sock",
            "\"/run/{v/m}/{vm}.sock\" has '{' or '}' outside the {vm} placeholder "
            "(only {vm} is supported)",
        ),
        (
            "/run/{vm}}.sock",
            "\"/run/{vm}}.sock\" has '{' or '}' outside the {vm} placeholder "
            "(only {vm} is supported)",
        ),
        (
            "/run/ch/{vm}\x00.sock",
            '"/run/ch/{vm}\\u0000.sock" contains the control character U+0000 (remove it; '
            "in a double-quoted TOML string a backslash starts an escape, "
            "so write \\\\ for a backslash or use single quotes)",
        ),
        (
            "/run/{VM}.sock",
            '"/run/{VM}.sock" has no {vm} placeholder (put {vm} where the VM name appears, '
            'e.g. "/run/cloud-hypervisor/{vm}.sock")',
        ),
    ],
)
def test_parse_rejects(template: str, message: str) -> None:
    with pytest.raises(ValueError, match=r".") as caught:
        ApiSocketPattern.parse(template)
    assert str(caught.value) == message


def test_direct_construction_validates_too() -> None:
    with pytest.raises(ValueError, match="is not an absolute path"):
        ApiSocketPattern("relative/{vm}.sock")


def test_patterns_compare_by_template() -> None:
    assert ApiSocketPattern.parse(FLAT) == ApiSocketPattern.parse(FLAT)
    assert ApiSocketPattern.parse(FLAT) != ApiSocketPattern.parse(COCOON)


@pytest.mark.parametrize("vm", ["", ".", "..", "../x", "a/b", "-a", "x" * 64])
def test_path_for_refuses_invalid_names(vm: str) -> None:
    with pytest.raises(ValueError, match="is not a valid VM name"):
        ApiSocketPattern.parse(FLAT).path_for(vm)


@pytest.mark.parametrize(
    ("name", "valid"),
    [
        ("web01", True),
        ("0", True),
        ("a.b_c-d", True),
        ("x" * 63, True),
        ("x" * 64, False),
        ("", False),
        (".", False),
        ("..", False),
        (".hidden", False),
        ("_x", False),
        ("web01\n", False),
        ("a/b", False),
        ("wéb", False),
    ],
)
def test_vm_name_re(name: str, valid: bool) -> None:
    assert bool(VM_NAME_RE.match(name)) is valid


def test_path_problem_can_skip_normalisation() -> None:
    assert path_problem("/srv/data/", normalised=False) is None
    assert path_problem("/srv/data/") is not None
    assert path_problem("/") is None
    assert path_problem("srv", normalised=False) == (
        "\"srv\" is not an absolute path (start it with '/')"
    )


@pytest.mark.parametrize(
    ("path", "shown", "code"),
    [
        ("/x/da\x00ta.sock", "/x/da\\u0000ta.sock", "U+0000"),  # Python: "embedded null byte"
        ("/srv\new", "/srv\\new", "U+000A"),  # what "/srv\new" in a TOML "..." string gives
        ("/srv\tdata", "/srv\\tdata", "U+0009"),
        ("/srv/\x1f", "/srv/\\u001f", "U+001F"),
        ("/srv/\x7f", "/srv/\\u007f", "U+007F"),  # DEL: JSON leaves it raw, and invisible
        ("srv\x00", "srv\\u0000", "U+0000"),  # reported before "not absolute"
    ],
)
@pytest.mark.parametrize("normalised", [True, False])
def test_path_problem_refuses_control_characters(
    path: str, shown: str, code: str, normalised: bool
) -> None:
    assert path_problem(path, normalised=normalised) == (
        f'"{shown}" contains the control character {code} (remove it; in a double-quoted '
        "TOML string a backslash starts an escape, so write \\\\ for a backslash "
        "or use single quotes)"
    )


@pytest.mark.parametrize("path", ["/srv/caf\u00e9", "/srv/ data ", "/srv/~x"])
def test_path_problem_accepts_printable_characters(path: str) -> None:
    assert path_problem(path) is None
