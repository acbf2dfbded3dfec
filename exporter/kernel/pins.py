"""Where the programs' maps and links are pinned in bpffs, so that they outlive the
exporter: a restart (an upgrade, a crash, a drain) finds the programs still attached
and counting, and carries on from their maps.

Layout: <root>/<digest>/ holds one build's pins. The digest covers everything that
shapes the maps and programs (the BPF sources, the build options, the offsets resolved
from this kernel, podnet's version), so pins are only ever reused by the build that
made them; any other directory under <root> is a previous build's and is removed,
which detaches its programs. In the digest directory:
  <program>-<variant>_<map>          each program's maps, per build variant
  <program>-<variant>_link_<hook>    the attachment of each hook
  <program>-<variant>_prog_<hook>    its program (for its run-time statistics)
The maps are pinned by BCC as it creates them (bpf/podnet.h PODNET_TABLE); a restart
opens the pins itself (BPF_OBJ_GET, which CAP_BPF allows) and never builds against them.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from exporter import __version__
from exporter.kernel.bpf_syscall import map_id, obj_get

log = logging.getLogger(__name__)

DEFAULT_ROOT = "/sys/fs/bpf/podnet"
_BPFFS_MAGIC = 0xCAFE4A11


def build_digest(sources: Iterable[Path], flags: Iterable[str]) -> str:
    """16 hex digits over the sources' names and contents and the build flags."""
    h = hashlib.sha256(__version__.encode())
    for path in sorted(sources):
        h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    for flag in sorted(flags):
        h.update(flag.encode() + b"\0")
    return h.hexdigest()[:16]


def variant_tag(cflags: Iterable[str]) -> str:
    """Short name of a build variant's own flags, part of its pins' names."""
    return hashlib.sha256("\0".join(sorted(cflags)).encode()).hexdigest()[:8]


def is_bpffs(path: str) -> bool:
    """Whether `path` is on a bpf filesystem (statfs f_type), not a plain directory that
    would lose the pins' meaning."""
    import ctypes

    class _Statfs(ctypes.Structure):
        _fields_ = [("f_type", ctypes.c_long), ("_rest", ctypes.c_byte * 120)]

    libc = ctypes.CDLL(None, use_errno=True)
    buf = _Statfs()
    if libc.statfs(path.encode(), ctypes.byref(buf)) != 0:
        return False
    return bool((buf.f_type & 0xFFFFFFFF) == _BPFFS_MAGIC)


class PinError(Exception):
    """Fatal at start-up: pins were asked for and cannot be kept. One line with the fix."""


@dataclass(frozen=True)
class Pins:
    root: str
    digest: str

    @property
    def dir(self) -> str:
        return os.path.join(self.root, self.digest)

    def prefix(self, program: str, tag: str) -> str:
        return os.path.join(self.dir, f"{program}-{tag}_")

    def link_path(self, program: str, tag: str, hook: str) -> str:
        return self.prefix(program, tag) + f"link_{hook}"

    def prog_path(self, program: str, tag: str, hook: str) -> str:
        return self.prefix(program, tag) + f"prog_{hook}"

    def cflags(self, program: str, tag: str) -> list[str]:
        return [f'-DPODNET_PIN_PREFIX="{self.prefix(program, tag)}"']

    def prepare(self) -> None:
        """The root must be on bpffs; the build's directory is created."""
        parent = self.root
        while not os.path.exists(parent):
            parent = os.path.dirname(parent) or "/"
        if not is_bpffs(parent):
            raise PinError(
                f"{parent} is not a bpf filesystem, so podnet cannot keep its counters across restarts: "
                "mount it (mount -t bpf bpf /sys/fs/bpf; the chart mounts the host's /sys/fs/bpf) "
                "or pass --pin-dir none"
            )
        try:
            os.makedirs(self.dir, mode=0o700, exist_ok=True)
        except OSError as e:
            raise PinError(
                f"cannot create {self.dir}: {e.strerror}; pass --pin-dir none to run without pins"
            ) from e

    def adopted(self, program: str) -> str | None:
        """The variant tag whose links a previous exporter left pinned for `program`."""
        pattern = re.compile(re.escape(program) + r"-([0-9a-f]{8})_link_")
        with contextlib.suppress(OSError):
            for name in sorted(os.listdir(self.dir)):
                m = pattern.match(name)
                if m:
                    return m.group(1)
        return None

    def has_links(self) -> bool:
        with contextlib.suppress(OSError):
            return any("_link_" in name for name in os.listdir(self.dir))
        return False

    def generation_map_ids(self) -> tuple[int, ...]:
        """Kernel ids (unique until reboot) of the pinned podnet_gen maps, one per program:
        what saved totals are bound to."""
        ids = []
        with contextlib.suppress(OSError):
            for name in sorted(os.listdir(self.dir)):
                if name.endswith("_podnet_gen"):
                    ids.append(self.map_id(name))
        return tuple(i for i in ids if i)

    def map_id(self, name: str) -> int:
        try:
            fd = obj_get(os.path.join(self.dir, name))
        except OSError:
            return 0
        try:
            return map_id(fd)
        finally:
            os.close(fd)

    def open_map(self, prefix: str, name: str) -> int | None:
        """A new fd of a pinned map (the caller closes it), None if there is no such pin."""
        try:
            return obj_get(prefix + name)
        except OSError:
            return None

    def unpin_prefix(self, program: str, tag: str) -> None:
        """Remove a variant's pins (its maps are freed once no program uses them)."""
        prefix = os.path.basename(self.prefix(program, tag))
        with contextlib.suppress(OSError):
            for name in os.listdir(self.dir):
                if name.startswith(prefix):
                    with contextlib.suppress(OSError):
                        os.unlink(os.path.join(self.dir, name))

    def discard_others(self) -> list[str]:
        """Remove other builds' pins (detaching their programs); returns their paths."""
        gone = []
        with contextlib.suppress(OSError):
            for name in sorted(os.listdir(self.root)):
                path = os.path.join(self.root, name)
                if name != self.digest and os.path.isdir(path):
                    remove_tree(path)
                    gone.append(path)
        return gone

    def discard(self) -> bool:
        """Remove this build's pins; True if there were any."""
        if not os.path.isdir(self.dir):
            return False
        remove_tree(self.dir)
        return True


def remove_tree(path: str) -> None:
    """rm -r on bpffs: unlinking a pin drops its reference; a link with no reference left
    detaches its program."""
    shutil.rmtree(path, ignore_errors=True)
