"""Kernel headers for BCC: which Debian packages to install, one merged tree of them, and where
podnet takes its headers from.

BCC compiles podnet's C at run time against ONE kernel headers tree: the directory named by the
environment variable ``BCC_KERNEL_SOURCE``, else ``/lib/modules/$(uname -r)/build`` (with its
``source`` sibling). Debian splits a kernel's headers into ``linux-headers-<v>-common`` and
``linux-headers-<v>-<flavour>`` (the generated config headers); neither alone compiles. podnet
therefore owns a tree, by default :data:`DEFAULT_TREE`: a symlink farm of the common directory with
the flavour directory on top, built by ``make setup``. Nothing is written under ``/lib/modules``.
podnet reads kernel struct layouts from BTF and takes only UAPI definitions and config macros from
the headers, so headers of any kernel version work; the nearest one is still preferred.

Stdlib only, and importable by the system python3 with just the repository on the path:
``scripts/setup.sh`` runs ``python3 -m exporter.kernel.headers`` before the virtualenv exists.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

__all__ = [
    "BCC_ENV",
    "DEFAULT_TREE",
    "PODNET_ENV",
    "Choice",
    "HeadersError",
    "HeadersPackage",
    "HeadersTree",
    "build_tree",
    "check_tree",
    "choose",
    "find_tree",
    "parse_packages",
]

DEFAULT_TREE: Final = "/var/lib/podnet/kernel-headers"
BCC_ENV: Final = "BCC_KERNEL_SOURCE"
PODNET_ENV: Final = "PODNET_KERNEL_HEADERS"
ORIGIN_FILE: Final = "podnet-headers.txt"
"""Written inside a tree podnet built: the two directories it merged."""
MODULES_DIR: Final = "/lib/modules"
USR_SRC: Final = "/usr/src"

_FIX: Final = "run 'make setup' (as root)"
_SHOW_PROBLEMS: Final = 3

# --- Debian package names ---------------------------------------------------------------------------

# linux-headers-<version>-<flavour>. Versions: 6.1.0-47, 6.12.117+deb12, 6.1.0-0.deb11.17 (backports),
# 6.12.12+bpo. Flavours: amd64, cloud-amd64, rt-amd64, arm64-16k; "common" and "common-rt" are the
# shared halves. A flavour starts with a letter, so "cloud" can never be read as part of a version.
# Meta-packages (linux-headers-amd64, linux-headers-6.12-cloud-amd64) have no x.y.z and do not match.
_VERSION: Final = r"\d+\.\d+\.\d+(?:-\d+(?:\.[a-z0-9]+)*|\+[a-z0-9]+)?"
_NAME: Final = re.compile(rf"linux-headers-(?P<version>{_VERSION})-(?P<flavour>[a-z][a-z0-9-]*)", re.ASCII)
_DIGITS: Final = re.compile(r"\d+", re.ASCII)


@dataclass(frozen=True, order=True)
class HeadersPackage:
    """One ``linux-headers-<version>-<flavour>`` package, its version and flavour kept apart."""

    version: str
    flavour: str

    @property
    def name(self) -> str:
        return f"linux-headers-{self.version}-{self.flavour}"

    @property
    def is_common(self) -> bool:
        """The shared half (``common``, ``common-rt``), not a flavour one can choose."""
        return self.flavour == "common" or self.flavour.startswith("common-")

    @property
    def common_name(self) -> str:
        """The package holding the rest of this flavour's headers."""
        return f"linux-headers-{self.version}-{_common_flavour(self.flavour)}"


def _common_flavour(flavour: str) -> str:
    # Debian's only featureset besides the default is "rt", whose flavours (rt-amd64) have their own
    # common package (common-rt); every other flavour (amd64, cloud-amd64, arm64-16k) uses "common".
    return "common-rt" if flavour.startswith("rt-") else "common"


def parse_package(name: str) -> HeadersPackage | None:
    """``linux-headers-6.12.117+deb12-cloud-amd64`` -> version 6.12.117+deb12, flavour cloud-amd64;
    None for anything else (meta-packages, other packages)."""
    m = _NAME.fullmatch(name.strip())
    return HeadersPackage(m["version"], m["flavour"]) if m else None


def parse_packages(lines: Iterable[str]) -> list[HeadersPackage]:
    """Packages from ``apt-cache search --names-only '^linux-headers-'`` output ("name - description"),
    or from bare names one per line; sorted, without duplicates."""
    found: set[HeadersPackage] = set()
    for line in lines:
        words = line.split()
        package = parse_package(words[0]) if words else None
        if package is not None:
            found.add(package)
    return sorted(found)


def version_key(version: str) -> tuple[int, ...]:
    """Numeric parts, compared in order: 6.1.0-47 < 6.1.0-50 < 6.12.107+deb12 < 6.12.117+deb12."""
    return tuple(int(d) for d in _DIGITS.findall(version))


def _not_newer(version: str, running: str) -> bool:
    run = version_key(running)
    # Compared on the running release's own precision: a kernel 6.12.117 built from upstream
    # sources is as new as Debian's 6.12.117+deb12.
    return version_key(version)[: len(run)] <= run


@dataclass(frozen=True)
class Choice:
    """The pair of packages to install: the flavour one and its common one."""

    package: HeadersPackage
    exact: bool
    """The running kernel's own headers (the release names a Debian package)."""

    @property
    def names(self) -> tuple[str, str]:
        return self.package.name, self.package.common_name


def choose(packages: Iterable[HeadersPackage], release: str, arch: str) -> Choice | None:
    """The headers to install for kernel ``release`` (``os.uname().release``) on dpkg architecture
    ``arch``, from the packages the archive offers; None when no flavour package with its common one
    fits.

    The running release's own package when Debian has it; otherwise, in the running kernel's flavour
    when Debian offers that flavour (e.g. a cloud-amd64 kernel no longer in the archive), else in the
    plain ``<arch>`` flavour (never rt), the newest version not newer than the running kernel, else
    the newest at all.
    """
    listed = list(packages)
    names = {p.name for p in listed}
    offered = [p for p in listed if not p.is_common]
    complete = [p for p in offered if p.common_name in names]
    for p in complete:
        if p.name == f"linux-headers-{release}":
            return Choice(p, exact=True)
    running = parse_package(f"linux-headers-{release}")
    flavours = {p.flavour for p in complete}
    flavour = running.flavour if running is not None and running.flavour in flavours else arch
    candidates = [p for p in complete if p.flavour == flavour]
    if not candidates:
        return None
    running_version = running.version if running is not None else release
    older = [p for p in candidates if _not_newer(p.version, running_version)]
    best = max(older or candidates, key=lambda p: version_key(p.version))
    return Choice(best, exact=False)


# --- checking a tree --------------------------------------------------------------------------------

# What BCC 0.26 opens in the tree (strace of a compile of every podnet program): it stats
# include/linux/kconfig.h to decide whether the tree is there at all ("Unable to find kernel headers"
# otherwise, then a crash inside libbcc), -includes it, then searches arch/<arch>/include{,/generated}
# {,/uapi}, include, include/uapi and include/generated/uapi. Debian's common package has the plain
# headers; the flavour package has every generated one.
_REQUIRED_FILES: Final = (
    "include/linux/kconfig.h",
    "include/linux/types.h",
    "include/uapi/linux/bpf.h",
    "include/generated/autoconf.h",
    "include/generated/uapi/linux/version.h",
)
_REQUIRED_DIRS: Final = (
    "arch/{arch}/include/asm",
    "arch/{arch}/include/uapi/asm",
    "arch/{arch}/include/generated/asm",
    "arch/{arch}/include/generated/uapi/asm",
)
# Searched for links that lead nowhere: every include path above lives under these.
_SCANNED: Final = ("include", "arch/{arch}/include")

# uname machine -> the kernel's arch/ directory, as BCC's kbuild helper maps it.
_ARCH_DIRS: Final = {
    "x86_64": "x86",
    "i386": "x86",
    "i686": "x86",
    "aarch64": "arm64",
    "ppc64le": "powerpc",
    "ppc64": "powerpc",
    "s390x": "s390",
    "riscv64": "riscv",
    "loongarch64": "loongarch",
    "mips64": "mips",
    "mips": "mips",
}


def arch_dir(machine: str | None = None, environ: Mapping[str, str] | None = None) -> str:
    """The kernel's arch/ directory for BCC: $ARCH when set (BCC honours it), else from uname."""
    env = os.environ if environ is None else environ
    if env.get("ARCH"):
        return env["ARCH"]
    machine = machine or os.uname().machine
    if machine.startswith("arm") and machine != "arm64":
        return "arm"
    return _ARCH_DIRS.get(machine, machine)


def check_tree(
    tree: str | os.PathLike[str], *, machine: str | None = None, also: Sequence[str] = ()
) -> list[str]:
    """What BCC would miss in this headers tree: one short phrase per problem (missing files, links
    that lead nowhere); empty when the tree is usable. ``also`` are further roots searched like the
    tree itself (``/lib/modules/<release>/source`` next to ``build``)."""
    root = Path(tree)
    if not root.is_dir():
        return ["does not exist" if not os.path.lexists(root) else "is not a directory"]
    roots = [root, *(Path(a) for a in also if Path(a).is_dir())]
    arch = arch_dir(machine)
    problems: list[str] = []
    for rel in _REQUIRED_FILES:
        if not any((r / rel).is_file() for r in roots):
            problems.append(f"missing {rel}")
    for pattern in _REQUIRED_DIRS:
        rel = pattern.format(arch=arch)
        if not any((r / rel).is_dir() for r in roots):
            problems.append(f"missing {rel}/")
    dangling: list[str] = []
    for r in roots:
        for pattern in _SCANNED:
            top = r / pattern.format(arch=arch)
            if top.is_dir():
                _dangling(top, dangling)
    problems += [f"dangling link {os.path.relpath(p, roots[0])}" for p in sorted(dangling)]
    return problems


def _dangling(top: Path, out: list[str]) -> None:
    # scandir knows links without a syscall; only links are stat()ed (~10k of them: ~60 ms).
    with os.scandir(top) as entries:
        for entry in entries:
            if entry.is_symlink():
                try:
                    os.stat(entry.path)
                except OSError:
                    out.append(entry.path)
            elif entry.is_dir():
                _dangling(Path(entry.path), out)


def summarise(problems: Sequence[str]) -> str:
    """check_tree's problems in a few words: "missing a, b, c and 6 more; dangling link d"."""
    groups: dict[str, list[str]] = {}
    for problem in problems:
        kind = next((k for k in ("missing", "dangling link") if problem.startswith(k + " ")), "")
        if kind:
            groups.setdefault(kind, []).append(problem[len(kind) + 1 :])
        else:
            groups.setdefault(problem, [])
    parts = []
    for kind, items in groups.items():
        shown = ", ".join(items[:_SHOW_PROBLEMS])
        more = len(items) - _SHOW_PROBLEMS
        parts.append(" ".join(filter(None, (kind, shown, f"and {more} more" if more > 0 else ""))))
    return "; ".join(parts)


# --- building podnet's tree -------------------------------------------------------------------------


class HeadersError(Exception):
    """One line: what is wrong and the fix."""


def read_origin(tree: str | os.PathLike[str]) -> dict[str, str]:
    """The ``key=value`` record a tree podnet built keeps of its sources; empty for other trees."""
    try:
        text = Path(tree, ORIGIN_FILE).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return {}
    out: dict[str, str] = {}
    for line in text.splitlines():
        key, eq, value = line.partition("=")
        if eq and not key.startswith("#"):
            out[key.strip()] = value.strip()
    return out


def describe_origin(tree: str | os.PathLike[str]) -> str:
    origin = read_origin(tree)
    names = [origin[k] for k in ("flavour_package", "common_package") if origin.get(k)]
    if not names:
        names = [Path(origin[k]).name for k in ("flavour", "common") if origin.get(k)]
    return " + ".join(names)


def _origin_text(common: Path, flavour: Path) -> str:
    lines = [
        "# podnet's kernel headers tree for BCC: symlinks into these directories, flavour on top.",
        "# Rebuild: python3 -m exporter.kernel.headers build COMMON FLAVOUR [DEST]",
        f"common={common}",
        f"flavour={flavour}",
    ]
    for key, directory in (("common_package", common), ("flavour_package", flavour)):
        if parse_package(directory.name) is not None:
            lines.append(f"{key}={directory.name}")
    return "\n".join(lines) + "\n"


def _link_farm(src: Path, dst: Path) -> int:
    """Mirror ``src`` into ``dst``: real directories, and a symlink to each file or link in ``src``
    (like ``cp -as``); entries already in ``dst`` are replaced, directories merged. Returns the
    number of links made."""
    made = 0
    with os.scandir(src) as entries:
        for entry in sorted(entries, key=lambda e: e.name):
            target = dst / entry.name
            if entry.is_dir(follow_symlinks=False):
                if target.is_symlink():
                    # A linked directory from the lower layer: expand it so both layers merge.
                    lower = os.readlink(target)
                    target.unlink()
                    target.mkdir()
                    if os.path.isdir(os.path.join(dst, lower)):
                        made += _link_farm(Path(dst, lower), target)
                elif not target.is_dir():
                    if os.path.lexists(target):
                        target.unlink()
                    target.mkdir()
                made += _link_farm(Path(entry.path), target)
                continue
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            elif os.path.lexists(target):
                target.unlink()
            os.symlink(entry.path, target)
            made += 1
    return made


_RENAME_EXCHANGE: Final = 2
_AT_FDCWD: Final = -100


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two directories (renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    rc = renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    return bool(rc == 0)


def _install(new: Path, dest: Path) -> None:
    """Put the finished tree ``new`` at ``dest``; afterwards ``new`` holds the old tree, if any."""
    if dest.is_dir() and not dest.is_symlink():
        if not _exchange(new, dest):
            old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old.", dir=dest.parent))
            os.rename(dest, old / "tree")
            os.rename(new, dest)
            os.rename(old, new)
        return
    if os.path.lexists(dest):
        dest.unlink()
    os.rename(new, dest)


def build_tree(
    common_dir: str | os.PathLike[str],
    flavour_dir: str | os.PathLike[str],
    dest: str | os.PathLike[str] = DEFAULT_TREE,
    *,
    machine: str | None = None,
) -> str:
    """Merge a Debian headers pair into ``dest`` (flavour on top) and return what was done, in one
    line. Built in a sibling temporary directory, checked, then swapped in atomically; nothing is done
    when ``dest`` already holds a valid merge of the same two directories. Raises HeadersError."""
    common, flavour = Path(os.path.abspath(common_dir)), Path(os.path.abspath(flavour_dir))
    for d in (common, flavour):
        if not d.is_dir():
            raise HeadersError(f"{d} is not a directory; install the linux-headers package of that name")
    target = Path(os.path.abspath(dest))
    origin = read_origin(target)
    if (
        origin.get("common") == str(common)
        and origin.get("flavour") == str(flavour)
        and not check_tree(target, machine=machine)
    ):
        return f"{target}: already merged from {flavour.name} and {common.name}"
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.new.", dir=target.parent))
    try:
        links = _link_farm(common, tmp) + _link_farm(flavour, tmp)
        Path(tmp, ORIGIN_FILE).write_text(_origin_text(common, flavour), encoding="utf-8")
        problems = check_tree(tmp, machine=machine)
        if problems:
            raise HeadersError(
                f"{flavour.name} merged with {common.name} is not a usable headers tree: "
                f"{summarise(problems)}; install a matching linux-headers-<v>-common and "
                "linux-headers-<v>-<flavour> pair"
            )
        tmp.chmod(0o755)  # mkdtemp made it private; the exporter may run without root
        _install(tmp, target)
    finally:
        # tmp now holds the replaced tree, or a failed build; leftovers of interrupted runs go too.
        for leftover in (
            tmp,
            *target.parent.glob(f".{target.name}.new.*"),
            *target.parent.glob(f".{target.name}.old.*"),
        ):
            shutil.rmtree(leftover, ignore_errors=True)
    return f"{target}: merged {flavour.name} over {common.name} ({links} links)"


# --- where podnet takes its headers from ------------------------------------------------------------


@dataclass(frozen=True)
class HeadersTree:
    """Where BCC will find the kernel headers, or why nowhere.

    ``source`` is "setting" (--kernel-headers, PODNET_KERNEL_HEADERS or the config file),
    "BCC_KERNEL_SOURCE", "podnet" (:data:`DEFAULT_TREE`), "modules" (BCC's own default,
    /lib/modules/<release>/build) or "" when none is usable."""

    path: str | None
    source: str
    detail: str
    """Which tree and where it came from; when none is usable, why (one line)."""
    fix: str = ""

    @property
    def ok(self) -> bool:
        return self.path is not None

    @property
    def reason(self) -> str:
        """One line for an error: the problem and its fix."""
        return f"{self.detail}; fix: {self.fix}" if self.fix else self.detail

    def use(self, environ: MutableMapping[str, str] | None = None) -> None:
        """Point BCC at this tree (``BCC_KERNEL_SOURCE``) before it compiles anything. For BCC's own
        default (/lib/modules) the variable is removed instead."""
        env = os.environ if environ is None else environ
        if self.path is None:
            return
        if self.source == "modules":
            env.pop(BCC_ENV, None)
        else:
            env[BCC_ENV] = self.path


def find_tree(
    explicit: str | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    own_tree: str = DEFAULT_TREE,
    modules_dir: str = MODULES_DIR,
    usr_src: str = USR_SRC,
    release: str | None = None,
    machine: str | None = None,
) -> HeadersTree:
    """The headers tree podnet will compile against, in order: ``explicit`` (the kernel_headers
    setting; when given it is the only candidate, so a mistake in it is reported, not bypassed),
    ``$BCC_KERNEL_SOURCE``, podnet's own tree, then ``/lib/modules/<release>/build`` with its
    ``source`` sibling. The first that passes :func:`check_tree` wins."""
    env = os.environ if environ is None else environ
    release = release or os.uname().release
    if explicit:
        problems = check_tree(explicit, machine=machine)
        if not problems:
            return HeadersTree(
                explicit, "setting", f"{explicit} (--kernel-headers / {PODNET_ENV} / kernel_headers)"
            )
        return HeadersTree(
            None,
            "",
            f"kernel headers {explicit} (--kernel-headers / {PODNET_ENV} / kernel_headers): "
            f"{summarise(problems)}",
            f"point the setting at a complete headers tree, or unset it and {_FIX} to build {own_tree}",
        )
    tried: list[str] = []
    bcc = env.get(BCC_ENV)
    if bcc:
        problems = check_tree(bcc, machine=machine)
        if not problems:
            return HeadersTree(bcc, BCC_ENV, f"{bcc} ({BCC_ENV})")
        tried.append(f"{BCC_ENV}={bcc} {summarise(problems)}")
    problems = check_tree(own_tree, machine=machine)
    if not problems:
        origin = describe_origin(own_tree)
        return HeadersTree(own_tree, "podnet", f"{own_tree} (podnet's tree{': ' + origin if origin else ''})")
    tried.append(f"{own_tree} {summarise(problems)}")
    build = Path(modules_dir, release, "build")
    source = build.parent / "source"
    problems = check_tree(build, machine=machine, also=[str(source)])
    if not problems:
        where = f"{build} -> {build.resolve()}"
        if source.is_dir():
            where += f", {source} -> {source.resolve()}"
        return HeadersTree(str(build), "modules", where)
    tried.append(f"{build} {summarise(problems)}")
    return HeadersTree(
        None, "", "no usable kernel headers for BCC: " + "; ".join(tried), _fix(usr_src, release, machine)
    )


def _fix(usr_src: str, release: str, machine: str | None) -> str:
    """How to get a tree: make setup, or by hand from a headers pair already installed."""
    try:
        names = os.listdir(usr_src)
    except OSError:
        names = []
    installed = parse_packages(names)
    pick = choose(installed, release, _dpkg_arch(machine)) if installed else None
    if pick is None:
        # Any installed pair will do (only UAPI and config macros are used): the newest, not rt.
        listed = {p.name for p in installed}
        pairs = [p for p in installed if not p.is_common and not p.flavour.startswith("rt-")]
        pairs = [p for p in pairs if p.common_name in listed]
        if pairs:
            pick = Choice(max(pairs, key=lambda p: version_key(p.version)), exact=False)
    if pick is None:
        return (
            f"{_FIX}; or install linux-headers-<v>-common and linux-headers-<v>-<flavour>, then "
            f"python3 -m exporter.kernel.headers build {usr_src}/linux-headers-<v>-common "
            f"{usr_src}/linux-headers-<v>-<flavour>"
        )
    flavour, common = pick.names
    return f"{_FIX}; or python3 -m exporter.kernel.headers build {usr_src}/{common} {usr_src}/{flavour}"


_DPKG_ARCHES: Final = {"x86_64": "amd64", "aarch64": "arm64", "i686": "i386", "ppc64le": "ppc64el"}


def _dpkg_arch(machine: str | None = None) -> str:
    if machine is None:
        try:
            out = subprocess.run(
                ["dpkg", "--print-architecture"], capture_output=True, text=True, check=True, timeout=10
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            out = ""
        if out:
            return out
    machine = machine or os.uname().machine
    return _DPKG_ARCHES.get(machine, machine)


# --- python3 -m exporter.kernel.headers ---------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python3 -m exporter.kernel.headers",
        description="Kernel headers for BCC: choose Debian packages, build podnet's tree, check a tree.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    pick = commands.add_parser(
        "choose",
        help="read `apt-cache search --names-only '^linux-headers-'` on stdin; "
        "print the flavour package and its common package",
    )
    pick.add_argument("--release", default=None, help="kernel release (default: uname -r)")
    pick.add_argument("--arch", default=None, help="dpkg architecture (default: dpkg --print-architecture)")
    build = commands.add_parser("build", help="merge a common and a flavour headers directory into DEST")
    build.add_argument("common_dir")
    build.add_argument("flavour_dir")
    build.add_argument("dest", nargs="?", default=DEFAULT_TREE)
    check = commands.add_parser(
        "check", help="check DIR, or without DIR the tree podnet would use; exit 1 when unusable"
    )
    check.add_argument("dir", nargs="?", default=None)
    ns = parser.parse_args(argv)
    prog = parser.prog

    if ns.command == "choose":
        release = ns.release or os.uname().release
        arch = ns.arch or _dpkg_arch()
        choice = choose(parse_packages(sys.stdin), release, arch)
        if choice is None:
            print(
                f"{prog}: no linux-headers-<v>-{arch} package with its -common package offered",
                file=sys.stderr,
            )
            return 1
        print(*choice.names)
        return 0
    if ns.command == "build":
        try:
            print(build_tree(ns.common_dir, ns.flavour_dir, ns.dest))
        except (HeadersError, OSError) as e:
            print(f"{prog}: error: {e}", file=sys.stderr)
            return 1
        return 0
    if ns.dir is not None:
        problems = check_tree(ns.dir)
        if problems:
            print(f"{prog}: {ns.dir} {summarise(problems)}", file=sys.stderr)
            return 1
        origin = describe_origin(ns.dir)
        print(f"{ns.dir}: usable{' (' + origin + ')' if origin else ''}")
        return 0
    found = find_tree(os.environ.get(PODNET_ENV) or None)
    if not found.ok:
        print(f"{prog}: {found.reason}", file=sys.stderr)
        return 1
    print(found.detail)
    return 0


if __name__ == "__main__":
    sys.exit(main())
