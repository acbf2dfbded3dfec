"""What the exporter process holds in its kernel maps, read with bpftool."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

# Kernel maps keyed by (cgroup id, ...): the key's first 8 bytes. Names as bpftool shows them
# (the kernel keeps 15 characters).
CGROUP_KEYED = (
    "tcp_flow_bytes",
    "tcp_flow_overflow",
    "tcp_rtt_hist",
    "request_hist",
    "tcp_conn_by_cgroup",
    "tcp_connect_duration_hist",
    "tcp_events_by_cgroup",
)
# Per-socket maps (and dead sockets' totals): where the owner's cgroup id sits in the value.
SOCKET_KEYED = {"tcp_socks_open": 0, "tcp_connects_pending": 8, "tcp_sock_identity": 0, "tcp_sock_final": 0}


def _bpftool(*args: str) -> object:
    out = subprocess.run(["bpftool", "-j", *args], check=True, capture_output=True, text=True).stdout
    return json.loads(out)


def _hex(words: object) -> bytes:
    assert isinstance(words, list)
    return bytes(int(str(b), 16) for b in words)


def exporter_maps(pid: int) -> dict[str, int]:
    """map name (as the kernel truncates it) -> id, for the maps the process holds open:
    other exporters on this machine have maps of the same names."""
    ids = set()
    for fd in os.listdir(f"/proc/{pid}/fdinfo"):
        try:
            info = Path(f"/proc/{pid}/fdinfo/{fd}").read_text()
        except OSError:
            continue
        for line in info.splitlines():
            if line.startswith("map_id:"):
                ids.add(int(line.split()[1]))
    out = {}
    for map_id in ids:
        shown = _bpftool("map", "show", "id", str(map_id))
        assert isinstance(shown, dict)
        out[str(shown.get("name", ""))] = map_id
    return out


def cgroups_in_maps(pid: int) -> dict[str, set[int]]:
    """Per map, the cgroup ids its entries belong to."""
    found: dict[str, set[int]] = {}
    for name, map_id in exporter_maps(pid).items():
        keyed = next((m for m in CGROUP_KEYED if m[:15] == name), None)
        sock = next((m for m in SOCKET_KEYED if m[:15] == name), None)
        if keyed is None and sock is None:
            continue
        entries = _bpftool("map", "dump", "id", str(map_id))
        assert isinstance(entries, list)
        ids: set[int] = set()
        for entry in entries:
            if "key" not in entry:  # deleted while bpftool dumped the map
                continue
            if keyed is not None:
                ids.add(int.from_bytes(_hex(entry["key"])[:8], "little"))
            else:
                off = SOCKET_KEYED[str(sock)]
                ids.add(int.from_bytes(_hex(entry["value"])[off : off + 8], "little"))
        found[keyed or str(sock)] = ids
    return found


class Totals:
    """What the exporter makes of the maps, for tests that drive programs directly: a
    MapReader and a Ledger whose peers are the raw addresses (flow_key)."""

    def __init__(self, programs: object) -> None:
        from exporter.kernel.maps import MapReader
        from exporter.metrics.ledger import Ledger

        self.reader = MapReader(programs)  # type: ignore[arg-type]
        self.ledger = Ledger()

    def read(self) -> object:
        """One poll: the totals so far (a RawData), kernel entries made final deleted."""
        ledger = self.ledger
        raw = ledger.apply(self.reader.read(ledger.committed_through, ledger.committed_sockets), by_address)
        self.reader.delete_final()
        ledger.committed_sockets = frozenset()
        return raw


def by_address(addr16: bytes) -> tuple[str, str, str]:
    return ("", addr16.hex(), "address")


def flow_key(cgroup_id: int, addr16: bytes) -> tuple[int, tuple[str, str, str]]:
    """A flow's key in Totals.read().flows."""
    return cgroup_id, by_address(addr16)
