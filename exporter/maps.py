"""Reading the kernel maps into plain Python data, one pass per poll.

Blocking (bpf syscalls): called from the poller's worker thread only.
"""

from __future__ import annotations

import ctypes as ct
import errno
import logging
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from exporter import bpf_structs as bs
from exporter.programs import LoadedPrograms

log = logging.getLogger(__name__)

Slots = dict[int, tuple[int, int]]
"""kernel histogram slot -> (count, sum in ns)."""


@dataclass
class CgroupCounters:
    sent: int = 0
    received: int = 0
    opened: list[int] = field(default_factory=lambda: [0, 0])
    closed: list[int] = field(default_factory=lambda: [0, 0])
    active: list[int] = field(default_factory=lambda: [0, 0])
    failed: list[int] = field(default_factory=lambda: [0, 0, 0, 0])
    retransmits: int = 0
    resets_sent: int = 0
    resets_received: int = 0


@dataclass
class RawData:
    """Everything one poll read, keyed by cgroup id; sums over CPUs already taken."""

    cgroups: dict[int, CgroupCounters] = field(default_factory=lambda: defaultdict(CgroupCounters))
    flows: dict[tuple[int, bytes], tuple[int, int]] = field(default_factory=dict)
    rtt: dict[int, Slots] = field(default_factory=lambda: defaultdict(dict))
    connect: dict[int, Slots] = field(default_factory=lambda: defaultdict(dict))
    map_failures: dict[str, int] = field(default_factory=dict)
    map_entries: dict[str, int] = field(default_factory=dict)


class MapReader:
    """Knows which map feeds which field; remembers whether batch lookups work."""

    def __init__(self, programs: LoadedPrograms) -> None:
        self._programs = programs
        self._batch_ok: dict[str, bool] = {}

    def _items(self, program: str, name: str) -> Iterator[tuple[Any, Any]]:
        table = self._programs.table(program, name)
        if table is None:
            return
        # One BPF_MAP_LOOKUP_BATCH syscall per chunk instead of two syscalls per entry.
        if self._batch_ok.get(name, True):
            try:
                yield from list(table.items_lookup_batch())
                self._batch_ok[name] = True
                return
            except Exception as e:
                # 524 is the kernel-internal ENOTSUPP some map types return for batch ops.
                if ct.get_errno() not in (errno.EINVAL, 524, errno.EOPNOTSUPP, 0):
                    raise
                log.info("batch lookups unavailable for map %s (%s); reading entry by entry", name, e)
                self._batch_ok[name] = False
        yield from list(table.items())

    def read(self) -> RawData:
        raw = RawData()
        p = self._programs
        if p.attached("tcp_traffic"):
            # A pod's byte totals are the sum of its flows (the kernel counts each event once).
            for k, per_cpu in self._items("tcp_traffic", "tcp_flow_bytes"):
                sent = sum(v.sent for v in per_cpu)
                received = sum(v.received for v in per_cpu)
                raw.flows[(k.cgroup_id, bytes(k.peer))] = (sent, received)
                c = raw.cgroups[k.cgroup_id]
                c.sent += sent
                c.received += received
            raw.map_entries["tcp_flow_bytes"] = len(raw.flows)
            raw.map_entries["tcp_rtt_hist"] = _read_hist(self._items("tcp_traffic", "tcp_rtt_hist"), raw.rtt)
        if p.attached("tcp_state"):
            n = 0
            for k, per_cpu in self._items("tcp_state", "tcp_conn_by_cgroup"):
                c = raw.cgroups[_int(k)]
                for v in per_cpu:
                    for i in range(2):
                        c.opened[i] += v.opened[i]
                        c.closed[i] += v.closed[i]
                        c.active[i] += v.active[i]
                    for i in range(4):
                        c.failed[i] += v.failed[i]
                n += 1
            raw.map_entries["tcp_conn_by_cgroup"] = n
            raw.map_entries["tcp_connect_duration_hist"] = _read_hist(
                self._items("tcp_state", "tcp_connect_duration_hist"), raw.connect
            )
            for name in ("tcp_connects_pending", "tcp_socks_open"):
                raw.map_entries[name] = sum(1 for _ in self._items("tcp_state", name))
        if p.attached("tcp_events"):
            n = 0
            for k, per_cpu in self._items("tcp_events", "tcp_events_by_cgroup"):
                c = raw.cgroups[_int(k)]
                c.retransmits += sum(v.retransmits for v in per_cpu)
                c.resets_sent += sum(v.resets_sent for v in per_cpu)
                c.resets_received += sum(v.resets_received for v in per_cpu)
                n += 1
            raw.map_entries["tcp_events_by_cgroup"] = n
        for program, map_names in bs.MAP_IDS.items():
            table = p.table(program, "map_update_failures")
            if table is None:
                continue
            for idx, per_cpu in table.items():
                if _int(idx) < len(map_names):
                    raw.map_failures[map_names[_int(idx)]] = sum(int(v) for v in per_cpu)
        return raw

    def delete_cgroups(self, raw: RawData, dead: set[int]) -> int:
        """Delete every map entry of the given cgroups (their values are already in
        `raw`, read this poll). Returns entries deleted. An event landing between this
        poll's read and the delete is lost: a window of one poll, for a dead cgroup."""
        p = self._programs
        keys: list[tuple[str, str, Any]] = []
        for cg in dead:
            keys += [
                ("tcp_state", "tcp_conn_by_cgroup", bs.CgroupKey(cg)),
                ("tcp_events", "tcp_events_by_cgroup", bs.CgroupKey(cg)),
            ]
            for slot in raw.rtt.get(cg, {}):
                keys.append(("tcp_traffic", "tcp_rtt_hist", bs.HistKey(cg, slot, 0)))
            for slot in raw.connect.get(cg, {}):
                keys.append(("tcp_state", "tcp_connect_duration_hist", bs.HistKey(cg, slot, 0)))
        for cg, peer in raw.flows:
            if cg in dead:
                key = bs.TcpFlowKey(cg, (ct.c_uint8 * 16).from_buffer_copy(peer))
                keys.append(("tcp_traffic", "tcp_flow_bytes", key))
        deleted = 0
        tables: dict[tuple[str, str], Any] = {}
        for program, name, key in keys:
            if not p.attached(program):
                continue
            table = tables.get((program, name))
            if table is None:
                table = tables[(program, name)] = p.table(program, name)
            if table is None:
                continue
            try:
                del table[key]
                deleted += 1
            except KeyError:
                pass
        return deleted


def _int(k: Any) -> int:
    """Scalar keys come back as int from batch lookups and as c_uint64 from items()."""
    return k if isinstance(k, int) else int(k.value)


def _read_hist(items: Iterator[tuple[Any, Any]], into: dict[int, Slots]) -> int:
    n = 0
    for k, per_cpu in items:
        count = sum(v.count for v in per_cpu)
        total = sum(v.sum_ns for v in per_cpu)
        if count:
            into[k.cgroup_id][k.slot] = (count, total)
        n += 1
    return n
