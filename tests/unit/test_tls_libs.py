"""exporter.kernel.tls_libs: libssl in /proc/<pid>/maps texts, scans of a fake /proc tree (maps
files, a `root` symlink into tmp_path, processes vanishing) and TlsAttacher's bookkeeping with a
fake attach, so nothing here needs BPF."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from exporter.kernel.tls_libs import (
    Library,
    LibraryScanner,
    TlsAttacher,
    attach_openssl,
    detach_openssl,
    find_libraries,
    libssl_paths,
    sweep_stale_uprobe_events,
)

DEB = "/usr/lib/x86_64-linux-gnu/libssl.so.3"


def line(path: str = "", addr: str = "7fc7cf634000-7fc7cf653000", inode: int = 339900) -> str:
    return f"{addr} r--p 00000000 fe:00 {inode}                     {path}".rstrip()


@pytest.mark.parametrize(
    ("path", "found"),
    [
        (DEB, True),
        ("/usr/lib/x86_64-linux-gnu/libssl.so.1.1", True),
        ("/usr/lib64/libssl.so.3.0.7", True),  # RHEL/Fedora: maps shows the symlink's target
        ("/usr/lib64/libssl.so.1.1.1k", True),  # RHEL 8
        ("/lib/libssl.so.3", True),  # Alpine
        ("/opt/my app/lib/libssl.so.3", True),  # spaces in the path
        (DEB + " (deleted)", False),  # the file is gone
        ("/usr/lib/x86_64-linux-gnu/libssl3.so", False),  # NSS
        ("/usr/lib/x86_64-linux-gnu/libssl.so", False),  # the development symlink
        ("/usr/lib/x86_64-linux-gnu/libssl.so.1.0.2", False),  # OpenSSL 1.0: not probed
        ("/usr/lib/libssl.so.3.bak", False),
        ("/usr/lib/libssl.so.30", False),
        ("/usr/lib/libssl.so.3x", False),
        ("/usr/lib/notlibssl.so.3", False),
        ("/usr/lib/libssl.so.3/libcrypto.so.3", False),
        ("[heap]", False),
        ("libssl.so.3", False),  # not a path (memfd names and the like start otherwise)
        ("", False),  # anonymous mapping
    ],
)
def test_libssl_paths_one_line(path: str, found: bool) -> None:
    assert libssl_paths(line(path) + "\n") == ({path} if found else set())


def test_libssl_paths_whole_maps_text() -> None:
    text = "\n".join(
        [
            line("/usr/bin/python3.11"),
            line(DEB, "7f00-7f10"),
            line(DEB, "7f10-7f20"),
            line(""),
            line("[vdso]"),
            line("/usr/lib/x86_64-linux-gnu/libcrypto.so.3"),
            line("/old/libssl.so.1.1 (deleted)"),
            line("/srv/a b/libssl.so.1.1"),
            "garbage",
            "",
        ]
    )
    assert libssl_paths(text) == {DEB, "/srv/a b/libssl.so.1.1"}


@given(st.lists(st.sampled_from(["", "[heap]", "/usr/bin/x", DEB, "/a b/libssl.so.1.1", "/x (deleted)"])))
def test_libssl_paths_is_the_set_of_matching_lines(paths: list[str]) -> None:
    text = "\n".join(line(p) for p in paths)
    assert libssl_paths(text) == {p for p in paths if p in (DEB, "/a b/libssl.so.1.1")}


@given(st.text())
def test_libssl_paths_never_raises(text: str) -> None:
    for path in libssl_paths(text):
        assert path.startswith("/") and not path.endswith(" (deleted)")


# --- a fake /proc ---------------------------------------------------------------------------


class FakeProc:
    def __init__(self, tmp: Path) -> None:
        self.proc = tmp / "proc"
        self.proc.mkdir()
        self.roots = tmp / "roots"
        self.roots.mkdir()

    def add(self, pid: int, libs: list[str], root: str = "host", start: int = 100, comm: str = "app") -> None:
        """A process whose root is roots/<root>, mapping `libs` (created there)."""
        d = self.proc / str(pid)
        d.mkdir(exist_ok=True)
        rootdir = self.roots / root
        for lib in libs:
            f = rootdir / lib.lstrip("/")
            f.parent.mkdir(parents=True, exist_ok=True)
            if not f.exists():
                f.write_bytes(b"\x7fELF" + lib.encode())
        if not (d / "root").is_symlink():
            (d / "root").symlink_to(rootdir)
        fields = ["S"] + ["0"] * 18 + [str(start)] + ["0"] * 30
        (d / "stat").write_text(f"{pid} ({comm}) " + " ".join(fields) + "\n")
        (d / "maps").write_text("".join(line(lib) + "\n" for lib in [*libs, "/usr/bin/app"]))

    def remove(self, pid: int) -> None:
        d = self.proc / str(pid)
        for name in ("stat", "maps", "root"):
            (d / name).unlink(missing_ok=True)
        d.rmdir()


@pytest.fixture
def fake(tmp_path: Path) -> FakeProc:
    return FakeProc(tmp_path)


def scanner(fake: FakeProc, **kw: object) -> LibraryScanner:
    return LibraryScanner(str(fake.proc), overlay=lambda path: False, **kw)  # type: ignore[arg-type]


def test_find_libraries_dedupes_by_file(fake: FakeProc) -> None:
    fake.add(10, [DEB])
    fake.add(11, [DEB])  # same file as pid 10
    fake.add(20, [DEB], root="container")  # same path, another file
    fake.add(30, [])
    (fake.proc / "self").mkdir()  # not a pid
    libs, stats = find_libraries(str(fake.proc))
    assert sorted((lib.pid, lib.path) for lib in libs) == [(10, DEB), (20, DEB)]
    for lib in libs:
        assert lib.open_path == f"{fake.proc}/{lib.pid}/root{DEB}"
        st = os.stat(lib.open_path)
        assert (lib.dev, lib.ino) == (st.st_dev, st.st_ino)
    assert (stats.pids, stats.maps_read, stats.libraries, stats.dropped) == (4, 4, 2, 0)


def test_a_chrooted_process_in_a_namespace_of_its_own(fake: FakeProc) -> None:
    # maps (and /proc/<pid>/root) show paths from its mount namespace's root, its own root's
    # path first: the library is found below /proc/<pid>/root all the same.
    fake.add(40, [DEB], root="chrooted")
    root = os.readlink(fake.proc / "40" / "root")
    (fake.proc / "40" / "maps").write_text(line(root + DEB) + "\n")
    (lib,) = find_libraries(str(fake.proc))[0]
    assert lib.path == root + DEB
    assert lib.open_path == f"{fake.proc}/40/root{DEB}"
    # A path outside the process's root is not reachable: not a library of it.
    (fake.proc / "40" / "maps").write_text(line("/elsewhere" + DEB) + "\n")
    assert find_libraries(str(fake.proc))[0] == []


def test_vanished_and_unreadable_processes_are_counted(fake: FakeProc) -> None:
    fake.add(10, [DEB])
    fake.add(11, [DEB], root="c1")
    (fake.proc / "11" / "maps").unlink()  # exited between listing and reading
    fake.add(12, ["/lib/libssl.so.1.1"], root="c2")
    (fake.proc / "12" / "root").unlink()  # mapped, but its root is gone: skipped
    fake.add(13, [DEB], root="c3")
    libs, stats = find_libraries(str(fake.proc))
    assert [lib.pid for lib in libs] == [10, 13]
    assert stats.vanished == 1


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_permission_denied_is_counted(fake: FakeProc) -> None:
    fake.add(10, [DEB])
    (fake.proc / "10" / "maps").chmod(0)
    _, stats = find_libraries(str(fake.proc))
    assert stats.denied == 1


def test_limit_drops_the_newest(fake: FakeProc) -> None:
    for pid in range(10, 15):
        fake.add(pid, [DEB], root=f"c{pid}")
    libs, stats = find_libraries(str(fake.proc), limit=3)
    assert [lib.pid for lib in libs] == [10, 11, 12]
    assert (stats.libraries, stats.dropped) == (3, 2)


def test_scanner_reads_maps_of_new_processes_only(fake: FakeProc) -> None:
    now = [0.0]
    s = scanner(fake, recheck_min=5.0, recheck_max=20.0, clock=lambda: now[0])
    fake.add(10, [])
    fake.add(11, [DEB])
    _, st = s.scan()
    assert st.maps_read == 2
    _, st = s.scan()
    assert st.maps_read == 0
    # pid 10 loads libssl (dlopen): found at its recheck, not before.
    fake.add(10, ["/lib/libssl.so.1.1"])
    libs, st = s.scan()
    assert st.maps_read == 0 and len(libs) == 1
    now[0] = 5.0
    libs, st = s.scan()
    assert st.maps_read == 2 and sorted(lib.pid for lib in libs) == [10, 11]
    # The delay doubles up to recheck_max.
    now[0] = 14.0
    assert s.scan()[1].maps_read == 0
    now[0] = 15.0
    assert s.scan()[1].maps_read == 2
    now[0] = 35.0
    assert s.scan()[1].maps_read == 2  # 20 s, not 40


def test_scanner_rereads_a_new_program_or_a_reused_pid(fake: FakeProc) -> None:
    s = scanner(fake, clock=lambda: 0.0)
    fake.add(10, [], comm="runc:[2:INIT]")
    assert s.scan()[0] == []
    fake.add(10, [DEB], comm="nginx")  # exec
    assert [lib.pid for lib in s.scan()[0]] == [10]
    fake.remove(10)
    assert s.scan()[0] == []
    fake.add(10, [], start=999)  # the pid is reused
    libs, st = s.scan()
    assert libs == [] and st.maps_read == 1


def test_overlay_files_are_one_library_whatever_the_device() -> None:
    def ovl(dev: int, pid: int, mtime_ns: int) -> Library:
        return Library(dev, 7, DEB, f"/proc/{pid}/root{DEB}", pid, size=9, mtime_ns=mtime_ns, overlay=True)

    a, b, c = ovl(41, 1, 5), ovl(43, 2, 5), ovl(41, 3, 6)
    assert a.key == b.key != c.key
    plain = [Library(dev=d, ino=7, path=DEB, open_path="", pid=1) for d in (41, 43)]
    assert plain[0].key != plain[1].key


# --- TlsAttacher ------------------------------------------------------------------------------


def lib(n: int) -> Library:
    return Library(dev=1, ino=n, path=f"/lib{n}/libssl.so.3", open_path=f"/proc/{n}/root/x", pid=n)


def test_attacher_attaches_each_file_once() -> None:
    calls: list[int] = []
    a: TlsAttacher[int] = TlsAttacher()
    assert a.attach_new([lib(1), lib(2), lib(1)], lambda x: calls.append(x.ino) or x.ino) == []
    assert a.attach_new([lib(1), lib(2), lib(3)], lambda x: calls.append(x.ino) or x.ino) == []
    assert calls == [1, 2, 3]
    assert (a.attached, a.attached_total, a.failed_total) == (3, 3, 0)


def test_attacher_failures_wait_retry_after() -> None:
    now = [0.0]
    tries: list[int] = []

    def attach(x: Library) -> int:
        tries.append(x.ino)
        if x.ino == 2:
            raise Exception("could not determine address of symbol SSL_write\nmore")
        return x.ino

    a: TlsAttacher[int] = TlsAttacher(retry_after=600, clock=lambda: now[0])
    problems = a.attach_new([lib(1), lib(2)], attach)
    assert problems == [
        "libssl /lib2/libssl.so.3 (pid 2, inode 2): Exception: could not determine address of symbol "
        "SSL_write; not retried for 600 s"
    ]
    assert a.attach_new([lib(1), lib(2)], attach) == []
    now[0] = 599
    a.attach_new([lib(2)], attach)
    assert tries == [1, 2]
    now[0] = 600
    assert len(a.attach_new([lib(2)], attach)) == 1
    assert tries == [1, 2, 2]
    assert (a.attached, a.failing, a.failed_total) == (1, 1, 2)


def test_attacher_limit_and_detach_gone() -> None:
    detached: list[int] = []
    a: TlsAttacher[int] = TlsAttacher(limit=2)
    a.attach_new([lib(1), lib(2), lib(3)], lambda x: x.ino)
    assert (a.attached, a.dropped) == (2, 1)
    assert a.detach_gone([lib(2), lib(3)], detached.append) == []
    assert detached == [1]
    a.attach_new([lib(2), lib(3)], lambda x: x.ino)
    assert (a.attached, a.dropped, a.detached_total) == (2, 0, 1)

    def broken(h: int) -> None:
        raise OSError("EBADF")

    assert a.detach_all(broken) == [
        "libssl /lib2/libssl.so.3 (pid 2, inode 2): detach: OSError: EBADF",
        "libssl /lib3/libssl.so.3 (pid 3, inode 3): detach: OSError: EBADF",
    ]
    assert a.attached == 0


# --- attach_openssl with a fake BCC object ---------------------------------------------------


class FakeBPF:
    def __init__(self, symbols: set[str]) -> None:
        self.symbols = symbols
        self.uprobe_fds: dict[bytes, int] = {}
        self.next_fd = 100

    def _attach(self, kind: bytes, name: bytes, sym: bytes, fn_name: bytes, pid: int) -> None:
        assert pid == -1 and fn_name.startswith(b"on_")
        if sym.decode() not in self.symbols:
            raise Exception(f"could not determine address of symbol {sym.decode()} in {name.decode()}")
        self.next_fd += 1
        self.uprobe_fds[kind + b"_" + name + b"_" + sym] = self.next_fd

    def attach_uprobe(self, name: bytes, sym: bytes, fn_name: bytes, pid: int) -> None:
        self._attach(b"p", name, sym, fn_name, pid)

    def attach_uretprobe(self, name: bytes, sym: bytes, fn_name: bytes, pid: int) -> None:
        self._attach(b"r", name, sym, fn_name, pid)

    def detach_uprobe_event(self, ev: bytes) -> None:
        del self.uprobe_fds[ev]


PROBES = [
    ("SSL_write", "on_ssl_write", False),
    ("SSL_write_ex", "on_ssl_write", False),
    ("SSL_read", "on_ssl_read", False),
    ("SSL_read", "on_ssl_read_ret", True),
]


def real_lib(tmp_path: Path) -> Library:
    f = tmp_path / "libssl.so.1.1"
    f.write_bytes(b"")
    return Library(dev=1, ino=2, path="/lib/libssl.so.1.1", open_path=str(f), pid=3)


def test_attach_openssl_skips_optional_symbols(tmp_path: Path) -> None:
    bpf = FakeBPF({"SSL_write", "SSL_read"})  # OpenSSL 1.1.0: no SSL_*_ex
    events = attach_openssl(bpf, real_lib(tmp_path), PROBES)
    assert len(events) == 3 and set(events) == set(bpf.uprobe_fds)
    detach_openssl(bpf, events)
    assert bpf.uprobe_fds == {}


def test_attach_openssl_missing_required_symbol_rolls_back(tmp_path: Path) -> None:
    bpf = FakeBPF({"SSL_write", "SSL_write_ex"})
    with pytest.raises(LookupError, match="no symbol SSL_read"):
        attach_openssl(bpf, real_lib(tmp_path), PROBES)
    assert bpf.uprobe_fds == {}


def test_attach_openssl_file_gone(tmp_path: Path) -> None:
    bpf = FakeBPF(set())
    gone = Library(dev=1, ino=2, path="/x", open_path=str(tmp_path / "nope"), pid=3)
    with pytest.raises(FileNotFoundError, match="is gone"):
        attach_openssl(bpf, gone, PROBES)


def test_stale_tracefs_events_of_dead_exporters_are_swept(tmp_path: Path) -> None:
    events = tmp_path / "uprobe_events"
    lines = [
        "p:uprobes/p__proc_self_fd_48_0x35980_bcc_111 /proc/self/fd/48:0x0000000000035980",
        "r:uprobes/r__proc_self_fd_48_0x35980_bcc_111 /proc/self/fd/48:0x0000000000035980",
        "p:uprobes/p__proc_self_fd_7_0x35980_bcc_222 /proc/self/fd/7:0x0000000000035980",  # alive
        # not ours:
        "p:uprobes/p__usr_lib_libssl_so_3_0x35980_bcc_111 /usr/lib/libssl.so.3:0x0000000000035980",
    ]
    events.write_text("\n".join(lines) + "\n")
    assert sweep_stale_uprobe_events(str(tmp_path), alive=lambda pid: pid == 222) == 2
    written = events.read_text().splitlines()[len(lines) :]
    assert written == [
        "-:uprobes/p__proc_self_fd_48_0x35980_bcc_111",
        "-:uprobes/r__proc_self_fd_48_0x35980_bcc_111",
    ]
    assert sweep_stale_uprobe_events(str(tmp_path / "none")) == 0
