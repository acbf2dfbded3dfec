"""Reading the kernel maps into plain Python data, one pass per poll.

Blocking (bpf syscalls): called from the poller's worker thread only.
"""

from __future__ import annotations

import ctypes as ct
import errno
import logging
import os
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from exporter import bpf_structs as bs
from exporter.programs import LoadedPrograms

log = logging.getLogger(__name__)

Slots = dict[int, tuple[int, int]]
"""kernel histogram slot -> (count, sum in ns)."""
RequestLabels = tuple[int, int, int, int]


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
    requests: dict[int, dict[RequestLabels, int]] = field(default_factory=lambda: defaultdict(dict))
    """cgroup -> (role, protocol, method, status class codes) -> requests."""
    request_hist: dict[int, dict[int, Slots]] = field(default_factory=lambda: defaultdict(dict))
    """cgroup -> attrs (role | protocol << 8) -> duration slots."""
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
            batches = lookup_batches(table)
            try:
                first = next(batches, None)
            except OSError as e:
                if e.errno not in _BATCH_UNSUPPORTED:
                    raise
                log.info("batch lookups unavailable for map %s (%s); reading entry by entry", name, e)
                self._batch_ok[name] = False
            else:
                self._batch_ok[name] = True
                if first is not None:
                    yield from _entries(*first)
                    for keys, values, n in batches:
                        yield from _entries(keys, values, n)
                return
        yield from list(table.items())

    def _count(self, program: str, name: str) -> int:
        """Entries in a map, without decoding them."""
        table = self._programs.table(program, name)
        if table is None:
            return 0
        if self._batch_ok.get(name, True):
            try:
                return sum(n for _, _, n in lookup_batches(table))
            except OSError as e:
                if e.errno not in _BATCH_UNSUPPORTED:
                    raise
                self._batch_ok[name] = False
        return sum(1 for _ in table)

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
            n = 0
            for k, per_cpu in self._items("tcp_traffic", "tcp_flow_overflow"):
                sent = sum(v.sent for v in per_cpu)
                received = sum(v.received for v in per_cpu)
                raw.flows[(_int(k), bs.UNTRACKED_PEER)] = (sent, received)
                c = raw.cgroups[_int(k)]
                c.sent += sent
                c.received += received
                n += 1
            raw.map_entries["tcp_flow_overflow"] = n
            raw.map_entries["tcp_rtt_hist"] = _read_hist(self._items("tcp_traffic", "tcp_rtt_hist"), raw.rtt)
            n = 0
            for k, per_cpu in self._items("tcp_traffic", "requests_by_cgroup"):
                labels = (k.role, k.protocol, k.method, k.status_class)
                raw.requests[k.cgroup_id][labels] = sum(int(v) for v in per_cpu)
                n += 1
            raw.map_entries["requests_by_cgroup"] = n
            n = 0
            for k, per_cpu in self._items("tcp_traffic", "request_duration_hist"):
                count = sum(v.count for v in per_cpu)
                if count:
                    by_attrs = raw.request_hist[k.cgroup_id].setdefault(k.attrs, {})
                    by_attrs[k.slot] = (count, sum(v.sum_ns for v in per_cpu))
                n += 1
            raw.map_entries["request_duration_hist"] = n
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
                raw.map_entries[name] = self._count("tcp_state", name)
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
            for role, proto, method, status in raw.requests.get(cg, {}):
                rk = bs.RequestKey(cg, role, proto, method, status, 0)
                keys.append(("tcp_traffic", "requests_by_cgroup", rk))
            for attrs, slots in raw.request_hist.get(cg, {}).items():
                for slot in slots:
                    keys.append(("tcp_traffic", "request_duration_hist", bs.HistKey(cg, slot, attrs)))
            for slot in raw.connect.get(cg, {}):
                keys.append(("tcp_state", "tcp_connect_duration_hist", bs.HistKey(cg, slot, 0)))
        for cg, peer in raw.flows:
            if cg not in dead:
                continue
            if peer == bs.UNTRACKED_PEER:
                keys.append(("tcp_traffic", "tcp_flow_overflow", bs.CgroupKey(cg)))
            else:
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


# 524 is the kernel-internal ENOTSUPP some map types return for batch ops.
_BATCH_UNSUPPORTED = (errno.EINVAL, 524, errno.EOPNOTSUPP, errno.ENOSYS)
BATCH_BYTES = 1 << 20
"""Buffer per BPF_MAP_LOOKUP_BATCH call. BCC 0.26's items_lookup_batch() allocates keys and
values for max_entries on every call: at the default --map-entries a per-CPU histogram map
then costs 24 MiB per poll on 2 CPUs and over 500 MiB on 64, which is an OOM, not a read."""


def lookup_batches(table: Any, budget: int = BATCH_BYTES) -> Iterator[tuple[Any, Any, int]]:
    """Every entry of a BCC hash table as (keys, values, n) chunks, by BPF_MAP_LOOKUP_BATCH
    with buffers of about `budget` bytes. Each chunk has fresh buffers, so entries stay valid
    after the next chunk is read. Raises OSError with the kernel's errno.

    Our own loop rather than BCC's: besides the allocation above, BCC 0.26 passes one
    c_uint32 as both the batch token and the count, so a read needing a second call would
    resume at a bucket number that is really an entry count."""
    from bcc.libbcc import lib  # late: importing exporter.maps must not need BCC

    entry = ct.sizeof(table.Key) + ct.sizeof(table.Leaf)
    chunk = max(1, min(int(table.max_entries), budget // entry))
    # Hash maps' batch token is a u32 bucket index; 64 bytes also fits a key-sized token.
    token_in = (ct.c_uint32 * 16)()
    token_out = (ct.c_uint32 * 16)()
    started = False
    while True:
        keys = (table.Key * chunk)()
        values = (table.Leaf * chunk)()
        count = ct.c_uint32(chunk)
        res = lib.bpf_lookup_batch(
            table.map_fd, token_in if started else None, token_out, keys, values, ct.byref(count)
        )
        err = ct.get_errno() if res != 0 else 0
        if err == errno.ENOSPC and count.value == 0 and chunk < table.max_entries:
            # One hash bucket holds more entries than the buffer: grow it and retry.
            chunk = min(int(table.max_entries), chunk * 2)
            continue
        if err not in (0, errno.ENOENT):
            raise OSError(err, f"BPF_MAP_LOOKUP_BATCH: {os.strerror(err)}")
        if count.value:
            yield keys, values, count.value
        if err == errno.ENOENT:  # the kernel's "no more entries"
            return
        ct.memmove(token_in, token_out, ct.sizeof(token_in))
        started = True


def _entries(keys: Any, values: Any, n: int) -> Iterator[tuple[Any, Any]]:
    for i in range(n):
        yield keys[i], values[i]


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
