"""The exporter's totals saved after every poll, so a restart continues them.

The kernel keeps only what was counted in the last two poll intervals (pinned, so it
outlives the exporter); everything older is in the exporter's totals. Those are saved
here, before the kernel entries they include are deleted: a restart between the two
finds both and, from `committed_through`, counts each entry once.

A saved file belongs to one set of pinned maps: it names the kernel ids of the pinned
podnet_gen maps (unique until reboot) and the boot. Any mismatch means the pins are not
the ones these totals came from: both are discarded and counting starts afresh.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import marshal
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from exporter.metrics.ledger import Ledger, decode_ledger, encode_ledger
from exporter.metrics.lifecycle import Retired

log = logging.getLogger(__name__)

FORMAT = 1
MAGIC = b"podnet-totals\n"
"""The file: MAGIC, then marshal data (plain dicts, tuples, ints and strings: written in a
few milliseconds at 1,000 pods, where JSON took over 100). Only root can write the
directory (0700); on loading every field is checked, and anything unexpected means
starting from zero, never a crash."""
DEFAULT_DIR = "/run/podnet"


def boot_id(path: str = "/proc/sys/kernel/random/boot_id") -> str:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return ""


@dataclass
class SavedState:
    ledger: Ledger
    retired: Retired
    counters_since: float
    """Unix time the totals started from zero: the start time of every cumulative series."""


class StateLockError(Exception):
    """Fatal at start-up: another exporter uses this state. One line with the fix."""


class StateLock:
    """One exporter per pinned state: two would each take and delete the kernel's final
    entries, and each would miss what the other took. Held (flock) for the process's
    life; a second exporter waits for it (a DaemonSet surge upgrade starts the new pod
    before the old one has gone), then gives up with one line."""

    def __init__(self, directory: str) -> None:
        self.path = os.path.join(directory, "lock")
        self._fd = -1

    def acquire(self, timeout: float, poll: float = 0.5) -> None:
        os.makedirs(os.path.dirname(self.path), mode=0o700, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        deadline = time.monotonic() + timeout
        logged = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
                if time.monotonic() >= deadline:
                    os.close(fd)
                    raise StateLockError(
                        f"another podnet-exporter (pid {holder}) uses {os.path.dirname(self.path)}: stop it, "
                        "or give this one its own --state-dir and --pin-dir"
                    ) from None
                if not logged:
                    logged = True
                    log.warning("waiting for the exporter holding %s (pid %s) to exit", self.path, holder)
                time.sleep(poll)
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class Checkpoint:
    def __init__(self, directory: str, digest: str) -> None:
        self.path = Path(directory, f"totals-{digest}")
        self.directory = directory
        self.saves = 0
        self.failures = 0
        self._logged = False

    def load(self, generation_maps: tuple[int, ...], max_identities: int) -> SavedState | None:
        """The saved totals if they belong to the pinned maps whose podnet_gen maps have
        these ids; None (with the reason logged) otherwise."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            log.warning("no saved totals at %s: counting starts from zero", self.path)
            return None
        except OSError as e:
            log.warning("saved totals %s unreadable (%s): counting starts from zero", self.path, e.strerror)
            return None
        d: Any = None
        if data.startswith(MAGIC):
            with contextlib.suppress(ValueError, EOFError, TypeError):
                d = marshal.loads(data[len(MAGIC) :])
        why = self._mismatch(d, generation_maps)
        if why:
            log.warning("saved totals %s not used: %s; counting starts from zero", self.path, why)
            return None
        try:
            since = d["counters_since"]
            if not isinstance(since, float):
                raise ValueError("bad start time")
            return SavedState(decode_ledger(d["ledger"]), Retired.decode(d["retired"], max_identities), since)
        except (KeyError, ValueError) as e:
            log.warning("saved totals %s malformed (%s): counting starts from zero", self.path, e)
            return None

    @staticmethod
    def _mismatch(d: Any, generation_maps: tuple[int, ...]) -> str:
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            return "unreadable, or written by another podnet version"
        if d.get("boot_id") != boot_id():
            return "written before the node rebooted"
        if not generation_maps or d.get("generation_maps") != generation_maps:
            return "they belong to other pinned maps"
        return ""

    def save(self, state: SavedState, generation_maps: tuple[int, ...]) -> bool:
        """Write atomically (a reader or a crash sees the old file or the new one).
        Failures are counted, logged once, and survived: the kernel entries they cover
        stay undeleted until a save works."""
        d = {
            "format": FORMAT,
            "boot_id": boot_id(),
            "generation_maps": tuple(generation_maps),
            "saved_at": time.time(),
            "counters_since": float(state.counters_since),
            "ledger": encode_ledger(state.ledger),
            "retired": state.retired.encode(),
        }
        tmp = ""
        try:
            os.makedirs(self.directory, mode=0o700, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".totals-")
            with os.fdopen(fd, "wb") as f:
                f.write(MAGIC + marshal.dumps(d))
            os.replace(tmp, self.path)
        except (OSError, ValueError) as e:
            self.failures += 1
            if not self._logged:
                self._logged = True
                log.error(
                    "cannot save totals to %s: %s; old kernel entries are kept until it works "
                    '(counted in podnet_exporter_errors_total{stage="checkpoint"})',
                    self.path,
                    getattr(e, "strerror", None) or e,
                )
            if tmp:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
            return False
        self.saves += 1
        return True

    def remove(self) -> None:
        with contextlib.suppress(OSError):
            self.path.unlink()
