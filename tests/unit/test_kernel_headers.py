"""exporter.kernel.headers: the Debian headers pair to install, podnet's merged tree, the check of
what BCC opens, and the order in which podnet looks for a tree. The package list is real
`apt-cache search --names-only '^linux-headers-'` output captured on a Debian 12 machine."""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from exporter.kernel import headers as kh
from exporter.kernel.headers import (
    BCC_ENV,
    HeadersError,
    HeadersPackage,
    build_tree,
    check_tree,
    choose,
    find_tree,
    parse_package,
    parse_packages,
)

ROOT = Path(__file__).resolve().parents[2]
APT_CACHE = (Path(__file__).parent / "data" / "apt-cache-search-linux-headers.txt").read_text()
PACKAGES = parse_packages(APT_CACHE.splitlines())


@pytest.fixture(autouse=True)
def _no_arch_override(monkeypatch: pytest.MonkeyPatch) -> None:
    # BCC honours $ARCH, and so does check_tree; these tests pin x86.
    monkeypatch.delenv("ARCH", raising=False)


# --- package names ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "parsed"),
    [
        ("linux-headers-6.12.117+deb12-cloud-amd64", ("6.12.117+deb12", "cloud-amd64")),
        ("linux-headers-6.12.117+deb12-amd64", ("6.12.117+deb12", "amd64")),
        ("linux-headers-6.12.117+deb12-common", ("6.12.117+deb12", "common")),
        ("linux-headers-6.12.117+deb12-common-rt", ("6.12.117+deb12", "common-rt")),
        ("linux-headers-6.1.0-47-cloud-amd64", ("6.1.0-47", "cloud-amd64")),
        ("linux-headers-6.1.0-47-rt-amd64", ("6.1.0-47", "rt-amd64")),
        ("linux-headers-6.1.0-0.deb11.17-amd64", ("6.1.0-0.deb11.17", "amd64")),
        ("linux-headers-6.12.12+bpo-cloud-arm64", ("6.12.12+bpo", "cloud-arm64")),
        ("linux-headers-6.12.38+deb13-arm64-16k", ("6.12.38+deb13", "arm64-16k")),
        # meta-packages and other packages
        ("linux-headers-amd64", None),
        ("linux-headers-cloud-amd64", None),
        ("linux-headers-6.12-amd64", None),
        ("linux-headers-6.12-cloud-amd64", None),
        ("linux-image-6.1.0-47-amd64", None),
        ("linux-kbuild-6.12.117+deb12", None),
    ],
)
def test_parse_package(name: str, parsed: tuple[str, str] | None) -> None:
    package = parse_package(name)
    assert (None if package is None else (package.version, package.flavour)) == parsed
    if package is not None:
        assert package.name == name


def test_parse_real_apt_cache_output() -> None:
    # 66 lines: 5 packages for each of 12 versions, and 6 meta-packages left out.
    assert len(APT_CACHE.splitlines()) == 66
    assert len(PACKAGES) == 60
    assert {p.flavour for p in PACKAGES} == {"amd64", "cloud-amd64", "rt-amd64", "common", "common-rt"}
    versions = {p.version for p in PACKAGES}
    assert "6.1.0-47" in versions and "6.12.117+deb12" in versions
    assert not any("cloud" in v for v in versions)
    assert all(p.version == "6.12.117+deb12" for p in PACKAGES if p.name.startswith("linux-headers-6.12.117"))


def test_common_package_of_each_flavour() -> None:
    assert HeadersPackage("6.1.0-47", "cloud-amd64").common_name == "linux-headers-6.1.0-47-common"
    assert HeadersPackage("6.1.0-47", "amd64").common_name == "linux-headers-6.1.0-47-common"
    assert HeadersPackage("6.1.0-47", "rt-amd64").common_name == "linux-headers-6.1.0-47-common-rt"


# --- choosing the pair ------------------------------------------------------------------------------

CHOICES = [
    # (running release, dpkg arch, chosen flavour package or None, exact)
    # This machine: not a Debian kernel -> plain amd64, the newest not newer (cloud is no version).
    ("6.18.44-fc-v1098", "amd64", "linux-headers-6.12.117+deb12-amd64", False),
    # Debian's own kernels: their own package.
    ("6.1.0-47-cloud-amd64", "amd64", "linux-headers-6.1.0-47-cloud-amd64", True),
    ("6.12.117+deb12-amd64", "amd64", "linux-headers-6.12.117+deb12-amd64", True),
    ("6.12.117+deb12-cloud-amd64", "amd64", "linux-headers-6.12.117+deb12-cloud-amd64", True),
    ("6.1.0-47-rt-amd64", "amd64", "linux-headers-6.1.0-47-rt-amd64", True),
    # A Debian kernel no longer in the archive: its flavour, newest not newer.
    ("6.1.0-49-cloud-amd64", "amd64", "linux-headers-6.1.0-47-cloud-amd64", False),
    ("6.1.0-60-amd64", "amd64", "linux-headers-6.1.0-57-amd64", False),
    ("6.12.110+deb12-cloud-amd64", "amd64", "linux-headers-6.12.107+deb12-cloud-amd64", False),
    # Other kernels: plain flavour, compared on the running release's own precision.
    ("6.12.113-custom", "amd64", "linux-headers-6.12.113+deb12-amd64", False),
    ("6.13.0", "amd64", "linux-headers-6.12.117+deb12-amd64", False),
    ("6.1.0", "amd64", "linux-headers-6.1.0-57-amd64", False),
    # Older than anything offered: the newest.
    ("5.10.0-30-amd64", "amd64", "linux-headers-6.12.117+deb12-amd64", False),
    ("5.10.0-30-cloud-amd64", "amd64", "linux-headers-6.12.117+deb12-cloud-amd64", False),
    # Nothing for this architecture.
    ("6.1.0-47-arm64", "arm64", None, False),
]


@pytest.mark.parametrize(("release", "arch", "package", "exact"), CHOICES, ids=[c[0] for c in CHOICES])
def test_choose(release: str, arch: str, package: str | None, exact: bool) -> None:
    choice = choose(PACKAGES, release, arch)
    if package is None:
        assert choice is None
        return
    assert choice is not None
    flavour_package = parse_package(package)
    assert flavour_package is not None
    assert choice.names == (package, flavour_package.common_name)
    assert choice.exact is exact


def test_choose_never_picks_rt_for_a_foreign_kernel() -> None:
    only_rt = [p for p in PACKAGES if p.flavour in ("rt-amd64", "common-rt", "common")]
    assert choose(only_rt, "6.18.44-fc-v1098", "amd64") is None
    for release in ("6.18.44-fc-v1098", "6.12.113-custom", "5.4.0"):
        choice = choose(PACKAGES, release, "amd64")
        assert choice is not None and "rt" not in choice.package.flavour


def test_choose_needs_both_halves() -> None:
    assert choose([], "6.1.0-47-amd64", "amd64") is None
    flavours_only = [p for p in PACKAGES if not p.is_common]
    assert choose(flavours_only, "6.1.0-47-amd64", "amd64") is None
    # 6.12.117's common package missing: the exact match and that version are skipped.
    partial = [p for p in PACKAGES if p.name != "linux-headers-6.12.117+deb12-common"]
    choice = choose(partial, "6.12.117+deb12-amd64", "amd64")
    assert choice is not None and choice.names[0] == "linux-headers-6.12.115+deb12-amd64"


def test_choose_reads_apt_cache_on_stdin(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO(APT_CACHE))
    assert kh.main(["choose", "--release", "6.1.0-47-cloud-amd64", "--arch", "amd64"]) == 0
    assert capsys.readouterr().out == "linux-headers-6.1.0-47-cloud-amd64 linux-headers-6.1.0-47-common\n"
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    assert kh.main(["choose", "--release", "6.1.0-47-amd64", "--arch", "amd64"]) == 1
    assert "no linux-headers-<v>-amd64 package" in capsys.readouterr().err


_versions = st.builds(
    lambda a, b, c, tail: f"{a}.{b}.{c}{tail}",
    st.integers(4, 7),
    st.integers(0, 20),
    st.integers(0, 200),
    st.one_of(
        st.just(""),
        st.integers(0, 99).map(lambda n: f"-{n}"),
        st.integers(10, 13).map(lambda n: f"+deb{n}"),
    ),
)
_flavours = st.sampled_from(
    ["amd64", "cloud-amd64", "rt-amd64", "common", "common-rt", "arm64", "cloud-arm64"]
)


@settings(max_examples=300, deadline=None)
@given(
    packages=st.lists(st.builds(HeadersPackage, _versions, _flavours), max_size=30),
    running=_versions,
    running_flavour=st.sampled_from(["amd64", "cloud-amd64", "rt-amd64", "fc-v1098", "custom"]),
)
def test_choose_properties(packages: list[HeadersPackage], running: str, running_flavour: str) -> None:
    release = f"{running}-{running_flavour}"
    choice = choose(packages, release, "amd64")
    names = {p.name for p in packages}
    complete = [p for p in packages if not p.is_common and p.common_name in names]
    if choice is None:
        # Nothing complete in the running kernel's flavour (when Debian's) or the plain one.
        assert not [p for p in complete if p.flavour in (running_flavour, "amd64")]
        return
    chosen = choice.package
    # Both halves are offered, and the flavour is the running one's or the plain arch.
    assert set(choice.names) <= names
    assert chosen.flavour in (running_flavour, "amd64")
    if chosen.flavour.startswith("rt-"):
        assert running_flavour == "rt-amd64"
    # Nothing of that flavour is a better fit: not newer than the running kernel, and newer.
    same = [p for p in complete if p.flavour == chosen.flavour]
    fitting = [p for p in same if kh._not_newer(p.version, running)]
    if choice.exact:
        assert chosen.name == f"linux-headers-{release}"
    elif fitting:
        assert kh._not_newer(chosen.version, running)
        assert kh.version_key(chosen.version) == max(kh.version_key(p.version) for p in fitting)
    else:
        assert kh.version_key(chosen.version) == max(kh.version_key(p.version) for p in same)


@given(version=_versions, flavour=_flavours)
def test_names_round_trip(version: str, flavour: str) -> None:
    assert parse_package(f"linux-headers-{version}-{flavour}") == HeadersPackage(version, flavour)


# --- checking a tree --------------------------------------------------------------------------------

COMMON_FILES = [
    "Makefile",
    "include/linux/kconfig.h",
    "include/linux/types.h",
    "include/uapi/linux/bpf.h",
    "arch/x86/include/asm/page.h",
    "arch/x86/include/uapi/asm/swab.h",
    "arch/arm64/include/asm/page.h",
]
FLAVOUR_FILES = [
    "Makefile",
    ".config",
    "include/generated/autoconf.h",
    "include/generated/uapi/linux/version.h",
    "arch/x86/include/generated/asm/rwonce.h",
    "arch/x86/include/generated/uapi/asm/types.h",
]


def _files(root: Path, files: list[str], tag: str) -> Path:
    for rel in files:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"/* {tag} {rel} */\n")
    return root


def headers_pair(base: Path, version: str = "6.12.117+deb12", flavour: str = "amd64") -> tuple[Path, Path]:
    """Fake /usr/src/linux-headers-<v>-common and -<flavour>, laid out like Debian's, including the
    relative `scripts` link into linux-kbuild."""
    common = _files(base / f"linux-headers-{version}-common", COMMON_FILES, "common")
    flav = _files(base / f"linux-headers-{version}-{flavour}", FLAVOUR_FILES, flavour)
    kbuild = base / f"linux-kbuild-{version}" / "scripts"
    kbuild.mkdir(parents=True, exist_ok=True)
    for d in (common, flav):
        (d / "scripts").symlink_to(Path("..", kbuild.parent.name, "scripts"))
    return common, flav


def complete_tree(base: Path) -> Path:
    return _files(base, COMMON_FILES + FLAVOUR_FILES, "tree")


def test_check_complete_tree(tmp_path: Path) -> None:
    assert check_tree(complete_tree(tmp_path / "t"), machine="x86_64") == []


@pytest.mark.parametrize(
    ("remove", "problem"),
    [
        ("include/linux/kconfig.h", "missing include/linux/kconfig.h"),
        ("include/generated/autoconf.h", "missing include/generated/autoconf.h"),
        ("include/generated/uapi/linux/version.h", "missing include/generated/uapi/linux/version.h"),
        ("arch/x86/include/generated/asm", "missing arch/x86/include/generated/asm/"),
        ("arch/x86/include/generated", "missing arch/x86/include/generated/asm/"),
        ("arch/x86/include/uapi", "missing arch/x86/include/uapi/asm/"),
    ],
)
def test_check_reports_what_is_missing(tmp_path: Path, remove: str, problem: str) -> None:
    tree = complete_tree(tmp_path / "t")
    path = tree / remove
    if path.is_dir():
        import shutil

        shutil.rmtree(path)
    else:
        path.unlink()
    assert problem in check_tree(tree, machine="x86_64")


def test_check_finds_dangling_links(tmp_path: Path) -> None:
    tree = complete_tree(tmp_path / "t")
    (tree / "include/linux/gone.h").symlink_to(tmp_path / "nowhere.h")
    (tree / "include/linux/kconfig.h").unlink()
    (tree / "include/linux/kconfig.h").symlink_to(tmp_path / "removed-package/kconfig.h")
    assert check_tree(tree, machine="x86_64") == [
        "missing include/linux/kconfig.h",
        "dangling link include/linux/gone.h",
        "dangling link include/linux/kconfig.h",
    ]
    # Outside the include paths a link may lead anywhere (scripts/ into linux-kbuild, say).
    (tree / "include/linux/gone.h").unlink()
    (tree / "include/linux/kconfig.h").unlink()
    (tree / "include/linux/kconfig.h").write_text("")
    (tree / "scripts").symlink_to(tmp_path / "no-kbuild")
    assert check_tree(tree, machine="x86_64") == []


def test_check_of_each_debian_half_alone_fails(tmp_path: Path) -> None:
    common, flavour = headers_pair(tmp_path)
    assert "missing include/generated/autoconf.h" in check_tree(common, machine="x86_64")
    assert "missing include/linux/kconfig.h" in check_tree(flavour, machine="x86_64")
    # BCC's default /lib/modules/<r>/build with its source sibling: one tree across both.
    assert check_tree(flavour, machine="x86_64", also=[str(common)]) == []


def test_check_uses_the_arch_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tree = complete_tree(tmp_path / "t")
    assert "missing arch/arm64/include/generated/asm/" in check_tree(tree, machine="aarch64")
    monkeypatch.setenv("ARCH", "arm64")
    assert "missing arch/arm64/include/uapi/asm/" in check_tree(tree, machine="x86_64")


def test_check_missing_or_not_a_directory(tmp_path: Path) -> None:
    assert check_tree(tmp_path / "none") == ["does not exist"]
    (tmp_path / "file").write_text("")
    assert check_tree(tmp_path / "file") == ["is not a directory"]


# --- building podnet's tree -------------------------------------------------------------------------


def _links(tree: Path) -> list[Path]:
    return [Path(d, n) for d, dirs, files in os.walk(tree) for n in dirs + files if Path(d, n).is_symlink()]


def test_build_merges_flavour_over_common(tmp_path: Path) -> None:
    common, flavour = headers_pair(tmp_path / "src")
    dest = tmp_path / "lib" / "kernel-headers"
    said = build_tree(common, flavour, dest, machine="x86_64")
    assert said.startswith(f"{dest}: merged linux-headers-6.12.117+deb12-amd64 over")
    assert check_tree(dest, machine="x86_64") == []
    links = _links(dest)
    assert len(links) == len(set(COMMON_FILES + FLAVOUR_FILES)) + 1  # + scripts
    assert all(link.exists() for link in links)  # every link made resolves
    assert (dest / "Makefile").read_text() == "/* amd64 Makefile */\n"  # flavour on top
    assert (dest / "include/linux/kconfig.h").read_text() == "/* common include/linux/kconfig.h */\n"
    assert (dest / "scripts").resolve() == (tmp_path / "src/linux-kbuild-6.12.117+deb12/scripts")
    origin = kh.read_origin(dest)
    assert origin["common"] == str(common) and origin["flavour"] == str(flavour)
    assert origin["flavour_package"] == "linux-headers-6.12.117+deb12-amd64"
    assert (
        kh.describe_origin(dest) == "linux-headers-6.12.117+deb12-amd64 + linux-headers-6.12.117+deb12-common"
    )
    assert oct(dest.stat().st_mode & 0o777) == "0o755"
    assert sorted(p.name for p in dest.parent.iterdir()) == ["kernel-headers"]  # no temporaries left


def test_build_is_idempotent_and_replaces_atomically(tmp_path: Path) -> None:
    common, flavour = headers_pair(tmp_path / "src")
    dest = tmp_path / "kernel-headers"
    build_tree(common, flavour, dest, machine="x86_64")
    inode = dest.stat().st_ino
    assert "already merged" in build_tree(common, flavour, dest, machine="x86_64")
    assert dest.stat().st_ino == inode
    # Another pair: a new directory swapped in, the old one removed.
    common2, flavour2 = headers_pair(tmp_path / "src", "6.1.0-47", "cloud-amd64")
    assert "merged linux-headers-6.1.0-47-cloud-amd64" in build_tree(
        common2, flavour2, dest, machine="x86_64"
    )
    assert dest.stat().st_ino != inode
    assert kh.read_origin(dest)["flavour"] == str(flavour2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kernel-headers", "src"]
    # A tree that no longer passes its check is rebuilt even from the same pair.
    (dest / "include/generated/autoconf.h").unlink()
    assert "merged" in build_tree(common2, flavour2, dest, machine="x86_64")
    assert check_tree(dest, machine="x86_64") == []


def test_build_without_renameat2_exchange(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kh, "_exchange", lambda a, b: False)
    common, flavour = headers_pair(tmp_path / "src")
    dest = tmp_path / "kernel-headers"
    build_tree(common, flavour, dest, machine="x86_64")
    (dest / "include/generated/autoconf.h").unlink()
    build_tree(common, flavour, dest, machine="x86_64")
    assert check_tree(dest, machine="x86_64") == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kernel-headers", "src"]


def test_build_refuses_an_incomplete_pair_and_keeps_the_old_tree(tmp_path: Path) -> None:
    common, flavour = headers_pair(tmp_path / "src")
    dest = tmp_path / "kernel-headers"
    build_tree(common, flavour, dest, machine="x86_64")
    with pytest.raises(
        HeadersError, match=r"not a usable headers tree: missing include/generated/autoconf.h"
    ):
        build_tree(common, common, dest, machine="x86_64")
    with pytest.raises(HeadersError, match=r"is not a directory; install"):
        build_tree(common, tmp_path / "src/linux-headers-6.12.117+deb12-cloud-amd64", dest)
    assert check_tree(dest, machine="x86_64") == []
    assert kh.read_origin(dest)["flavour"] == str(flavour)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kernel-headers", "src"]


def test_build_expands_a_linked_directory_of_the_lower_layer(tmp_path: Path) -> None:
    common, flavour = headers_pair(tmp_path / "src")
    # common links a directory that flavour has as a real one: both layers end up merged.
    elsewhere = _files(tmp_path / "elsewhere", ["tools/a.h"], "common")
    (common / "tools").symlink_to(elsewhere / "tools")
    _files(flavour, ["tools/b.h"], "flavour")
    dest = tmp_path / "kernel-headers"
    build_tree(common, flavour, dest, machine="x86_64")
    assert sorted(p.name for p in (dest / "tools").iterdir()) == ["a.h", "b.h"]
    assert not (dest / "tools").is_symlink()


def test_build_and_check_from_the_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    common, flavour = headers_pair(tmp_path / "src")
    dest = tmp_path / "kernel-headers"
    if os.uname().machine != "x86_64":
        pytest.skip("the fake headers are x86's")
    assert kh.main(["build", str(common), str(flavour), str(dest)]) == 0
    assert capsys.readouterr().out.startswith(f"{dest}: merged")
    assert kh.main(["check", str(dest)]) == 0
    assert "usable (linux-headers-6.12.117+deb12-amd64 + " in capsys.readouterr().out
    assert kh.main(["check", str(common)]) == 1
    assert "missing include/generated/autoconf.h" in capsys.readouterr().err
    assert kh.main(["build", str(common), str(tmp_path / "none"), str(dest)]) == 1
    assert "error:" in capsys.readouterr().err


def test_module_needs_only_the_system_python(tmp_path: Path) -> None:
    """setup.sh runs it with Debian's python3 before the virtualenv exists."""
    system = Path("/usr/bin/python3")
    if not system.exists():
        pytest.skip("no /usr/bin/python3")
    code = (
        "import sys; before = set(sys.modules); import exporter.kernel.headers; "
        "new = {m.split('.')[0] for m in set(sys.modules) - before}; "
        "print(sorted(new - set(sys.stdlib_module_names) - {'exporter'}))"
    )
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [str(system), "-c", code], env=env, capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.strip() == "[]", out.stdout
    proc = subprocess.run(
        [
            str(system),
            "-m",
            "exporter.kernel.headers",
            "choose",
            "--release",
            "6.1.0-47-cloud-amd64",
            "--arch",
            "amd64",
        ],
        input=APT_CACHE,
        cwd=ROOT,
        env={"PATH": env["PATH"]},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (proc.returncode, proc.stdout) == (
        0,
        "linux-headers-6.1.0-47-cloud-amd64 linux-headers-6.1.0-47-common\n",
    )


# --- where podnet takes its headers from ------------------------------------------------------------

RELEASE = "6.18.44-fc-v1098"


@pytest.fixture
def places(tmp_path: Path) -> dict[str, Path]:
    """A complete tree for each place podnet looks, and an empty /usr/src."""
    out = {name: complete_tree(tmp_path / name) for name in ("explicit", "bcc", "own")}
    out["modules"] = tmp_path / "modules"
    complete_tree(out["modules"] / RELEASE / "build")
    out["usr_src"] = tmp_path / "usr_src"
    out["usr_src"].mkdir()
    out["broken"] = tmp_path / "broken"
    (out["broken"] / "include/linux").mkdir(parents=True)
    return out


def _find(places: dict[str, Path], explicit: str | None = None, **env: str) -> kh.HeadersTree:
    return find_tree(
        explicit,
        environ=env,
        own_tree=str(places["own"]),
        modules_dir=str(places["modules"]),
        usr_src=str(places["usr_src"]),
        release=RELEASE,
        machine="x86_64",
    )


def test_find_order(places: dict[str, Path]) -> None:
    import shutil

    bcc = {BCC_ENV: str(places["bcc"])}
    assert _find(places, str(places["explicit"]), **bcc).source == "setting"
    assert _find(places, None, **bcc).source == BCC_ENV
    assert _find(places, None, **{BCC_ENV: str(places["broken"])}).source == "podnet"
    found = _find(places)
    assert (found.source, found.path) == ("podnet", str(places["own"]))
    assert found.detail.startswith(f"{places['own']} (podnet's tree")
    shutil.rmtree(places["own"])
    found = _find(places)
    assert (found.source, found.path) == ("modules", str(places["modules"] / RELEASE / "build"))
    shutil.rmtree(places["modules"])
    found = _find(places, None, **{BCC_ENV: str(places["broken"])})
    assert not found.ok
    assert found.detail == (
        f"no usable kernel headers for BCC: {BCC_ENV}={places['broken']} missing include/linux/kconfig.h, "
        "include/linux/types.h, include/uapi/linux/bpf.h and 6 more; "
        f"{places['own']} does not exist; {places['modules']}/{RELEASE}/build does not exist"
    )
    assert found.fix.startswith("run 'make setup' (as root); or install linux-headers-<v>-common and ")
    assert "\n" not in found.reason and found.reason.endswith(found.fix)


def test_find_explicit_setting_is_never_bypassed(places: dict[str, Path]) -> None:
    found = _find(places, str(places["broken"]), **{BCC_ENV: str(places["bcc"])})
    assert not found.ok
    assert found.detail.startswith(
        f"kernel headers {places['broken']} (--kernel-headers / PODNET_KERNEL_HEADERS"
    )
    assert "missing include/linux/kconfig.h" in found.detail
    assert "make setup" in found.fix


def test_find_modules_build_with_source_sibling(places: dict[str, Path]) -> None:
    import shutil

    shutil.rmtree(places["own"])
    shutil.rmtree(places["modules"])
    common, flavour = headers_pair(places["usr_src"])
    kdir = places["modules"] / RELEASE
    kdir.mkdir(parents=True)
    (kdir / "build").symlink_to(flavour)
    assert not _find(places).ok
    (kdir / "source").symlink_to(common)
    found = _find(places)
    assert (found.source, found.path) == ("modules", str(kdir / "build"))
    assert found.detail == f"{kdir / 'build'} -> {flavour}, {kdir / 'source'} -> {common}"


def test_find_suggests_building_from_an_installed_pair(places: dict[str, Path]) -> None:
    import shutil

    shutil.rmtree(places["own"])
    shutil.rmtree(places["modules"])
    headers_pair(places["usr_src"], "6.12.117+deb12", "cloud-amd64")
    found = _find(places)
    assert not found.ok
    src = places["usr_src"]
    assert found.fix == (
        "run 'make setup' (as root); or python3 -m exporter.kernel.headers build "
        f"{src}/linux-headers-6.12.117+deb12-common {src}/linux-headers-6.12.117+deb12-cloud-amd64"
    )


def test_use_points_bcc_at_the_tree(places: dict[str, Path]) -> None:
    env: dict[str, str] = {BCC_ENV: "/stale"}
    _find(places).use(env)
    assert env == {BCC_ENV: str(places["own"])}
    modules = kh.HeadersTree("/lib/modules/x/build", "modules", "")
    modules.use(env)
    assert env == {}  # BCC's own default
    kh.HeadersTree(None, "", "none").use(env)
    assert env == {}


# --- doctor and run with a broken tree: one line and exit 1, never libbcc's crash ---------------------


def _clean_env() -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PODNET_", "OTEL_", "KUBERNETES_")) and k not in (BCC_ENV, "NODE_NAME")
    }
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


needs_btf = pytest.mark.skipif(
    not os.access("/sys/kernel/btf/vmlinux", os.R_OK), reason="run reaches the headers check after BTF"
)


@pytest.fixture
def broken_tree(tmp_path: Path) -> Path:
    # kconfig.h present, the flavour half absent: the tree BCC half-accepts and then crashes on.
    tree = tmp_path / "headers"
    _files(tree, COMMON_FILES, "common")
    return tree


def test_doctor_with_broken_headers_fails_in_one_line(broken_tree: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "exporter", "doctor", "--kernel-headers", str(broken_tree)],
        cwd=ROOT,
        env=_clean_env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stdout + proc.stderr
    lines = [line for line in proc.stdout.splitlines() if "kernel headers" in line]
    assert len(lines) == 1, proc.stdout
    assert lines[0].startswith(f"[FAIL] kernel headers: kernel headers {broken_tree} (--kernel-headers")
    assert "missing include/generated/autoconf.h" in lines[0]
    assert "-> fix: point the setting at a complete headers tree" in lines[0]
    assert "compile and attach" not in proc.stdout  # nothing was handed to BCC


@needs_btf
def test_run_with_broken_headers_exits_1_with_one_line(broken_tree: Path) -> None:
    proc = subprocess.run(
        [
            *(sys.executable, "-m", "exporter", "run", "--kernel-headers", str(broken_tree)),
            *("--listen", f"127.0.0.1:{_free_port()}", "--log-level", "error"),
        ],
        cwd=ROOT,
        env=_clean_env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 1, (proc.returncode, proc.stderr)
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"podnet-exporter: error: kernel headers {broken_tree} (--kernel-headers")
    assert "missing include/generated/autoconf.h" in lines[0]
    assert "; fix: " in lines[0]
