"""Reading the kernel maps into plain Python data, one pass per poll.

Blocking (bpf syscalls): called from the poller's worker thread only.
"""

from __future__ import annotations

import ctypes as ct
import errno
import logging
import os
from collections.abc import Iterator
from typing import Any

from exporter.kernel import bpf_structs as bs
from exporter.kernel.programs import LoadedPrograms
from exporter.kernel.sockbytes import SocketBytes, SocketTotals, read_slots
from exporter.metrics.raw import UNTRACKED_PEER, RawData, Slots

log = logging.getLogger(__name__)


class MapReader:
    """Knows which map feeds which field; remembers whether batch lookups work."""

    def __init__(self, programs: LoadedPrograms, max_flows: int = 1 << 18) -> None:
        self._programs = programs
        self._batch_ok: dict[str, bool] = {}
        self._sockets = SocketBytes(max_flows)

    def _chunks(self, name: str, table: Any) -> list[tuple[Any, Any, int]] | None:
        """The whole map as BPF_MAP_LOOKUP_BATCH chunks (one syscall per ~1 MiB instead of
        two per entry), or None where the kernel refuses batch lookups for this map (then
        remembered, and the caller reads entry by entry)."""
        if not self._batch_ok.get(name, True):
            return None
        try:
            chunks = list(lookup_batches(table))
        except OSError as e:
            if e.errno not in _BATCH_UNSUPPORTED:
                raise
            log.info("batch lookups unavailable for map %s (%s); reading entry by entry", name, e)
            self._batch_ok[name] = False
            return None
        self._batch_ok[name] = True
        return chunks

    def _summed(self, program: str, name: str) -> Iterator[tuple[Any, tuple[int, ...]]]:
        """(key, value words summed over CPUs) of every entry of a per-CPU map; the words
        in the value struct's memory order (arrays flattened)."""
        table = self._programs.table(program, name)
        if table is None:
            return
        ncpu, signed = table.total_cpu, _words(table.sLeaf)
        chunks = self._chunks(name, table)
        if chunks is not None:
            for keys, values, n in chunks:
                yield from zip(keys[:n], _cpu_sums(values, n, ncpu, signed), strict=True)
            return
        items = list(table.items())
        if items:
            values = (table.Leaf * len(items))(*(v for _, v in items))
            sums = _cpu_sums(values, len(items), ncpu, signed)
            yield from zip((k for k, _ in items), sums, strict=True)

    def _count(self, program: str, name: str) -> int:
        """Entries in a map, without decoding them."""
        table = self._programs.table(program, name)
        if table is None:
            return 0
        chunks = self._chunks(name, table)
        if chunks is not None:
            return sum(n for _, _, n in chunks)
        return sum(1 for _ in table)

    def read(self) -> RawData:
        raw = RawData()
        p = self._programs
        if p.attached("tcp_traffic"):
            # A pod's byte totals are the sum of its flows (the kernel counts each event once).
            for k, (sent, received) in self._summed("tcp_traffic", "tcp_flow_bytes"):
                raw.flows[(k.cgroup_id, bytes(k.peer))] = (sent, received)
                c = raw.cgroups[k.cgroup_id]
                c.sent += sent
                c.received += received
            raw.map_entries["tcp_flow_bytes"] = len(raw.flows)
            n = 0
            for k, (sent, received) in self._summed("tcp_traffic", "tcp_flow_overflow"):
                raw.flows[(_int(k), UNTRACKED_PEER)] = (sent, received)
                c = raw.cgroups[_int(k)]
                c.sent += sent
                c.received += received
                n += 1
            raw.map_entries["tcp_flow_overflow"] = n
            self._read_sockets(raw)
            raw.map_entries["tcp_rtt_hist"] = _read_hist(self._summed("tcp_traffic", "tcp_rtt_hist"), raw.rtt)
            n = 0
            for k, (count, total) in self._summed("tcp_traffic", "request_hist"):
                if count:
                    labels = (k.role, k.protocol, k.method, k.status_class)
                    slots = raw.requests[k.cgroup_id].setdefault(labels, {})
                    slots[k.slot] = (count, total)
                n += 1
            raw.map_entries["request_hist"] = n
        if p.attached("tcp_state"):
            n = 0
            for k, w in self._summed("tcp_state", "tcp_conn_by_cgroup"):
                # Words: opened[2], closed[2], active[2], failed[4].
                c = raw.cgroups[_int(k)]
                for i in range(2):
                    c.opened[i] += w[i]
                    c.closed[i] += w[2 + i]
                    c.active[i] += w[4 + i]
                for i in range(4):
                    c.failed[i] += w[6 + i]
                n += 1
            raw.map_entries["tcp_conn_by_cgroup"] = n
            raw.map_entries["tcp_connect_duration_hist"] = _read_hist(
                self._summed("tcp_state", "tcp_connect_duration_hist"), raw.connect
            )
            for name in ("tcp_connects_pending", "tcp_socks_open"):
                raw.map_entries[name] = self._count("tcp_state", name)
        if p.attached("tcp_events"):
            n = 0
            for k, (retransmits, resets_sent, resets_received) in self._summed(
                "tcp_events", "tcp_events_by_cgroup"
            ):
                c = raw.cgroups[_int(k)]
                c.retransmits += retransmits
                c.resets_sent += resets_sent
                c.resets_received += resets_received
                n += 1
            raw.map_entries["tcp_events_by_cgroup"] = n
        for program, map_names in bs.MAP_IDS.items():
            table = p.table(program, "map_update_failures")
            if table is None:
                continue
            for idx, per_cpu in table.items():
                if _int(idx) < len(map_names):
                    raw.map_failures[map_names[_int(idx)]] = sum(int(v) for v in per_cpu)
        if self._sockets.overflowed:
            # Dead sockets' flows beyond max_flows (kept here, not in the kernel): the flow
            # table is full all the same.
            kernel = raw.map_failures.get("tcp_flow_bytes", 0)
            raw.map_failures["tcp_flow_bytes"] = kernel + self._sockets.overflowed
        return raw

    def _read_sockets(self, raw: RawData) -> None:
        """The tp_btf build's per-socket counters: live sockets first, then the totals of
        sockets that died, taken out of the kernel as they are read."""
        slots = self._programs.socket_slot_array("tcp_traffic")
        if slots is None:
            return
        table = self._programs.table("tcp_traffic", "tcp_sock_final")
        ids = self._programs.table("tcp_traffic", "tcp_sock_ids")
        if table is None or ids is None:
            return
        live = read_slots(slots.elements, ids[ct.c_uint32(0)].slots_taken)
        finals = [
            SocketTotals(int(keys[i]), (v.flow.cgroup_id, bytes(v.flow.peer)), v.sent, v.received)
            for keys, values, n in lookup_batches(table, delete=True)
            for i, v in enumerate(values[:n])
        ]
        for flow, (sent, received) in self._sockets.fold(live, finals).items():
            s0, r0 = raw.flows.get(flow, (0, 0))
            raw.flows[flow] = (s0 + sent, r0 + received)
            c = raw.cgroups[flow[0]]
            c.sent += sent
            c.received += received
        raw.map_entries["tcp_sock_slots"] = len(live)
        raw.map_entries["tcp_sock_final"] = len(finals)

    def delete_cgroups(self, raw: RawData, dead: set[int]) -> int:
        """Delete every map entry of the given cgroups (their values are already in
        `raw`, read this poll). Returns entries deleted. An event landing between this
        poll's read and the delete is lost: a window of one poll, for a dead cgroup."""
        p = self._programs
        self._sockets.forget(dead)
        keys: list[tuple[str, str, Any]] = []
        for cg in dead:
            keys += [
                ("tcp_state", "tcp_conn_by_cgroup", bs.CgroupKey(cg)),
                ("tcp_events", "tcp_events_by_cgroup", bs.CgroupKey(cg)),
            ]
            for slot in raw.rtt.get(cg, {}):
                keys.append(("tcp_traffic", "tcp_rtt_hist", bs.HistKey(cg, slot, 0)))
            for (role, proto, method, status), slots in raw.requests.get(cg, {}).items():
                for slot in slots:
                    rk = bs.RequestKey(cg, role, proto, method, status, slot)
                    keys.append(("tcp_traffic", "request_hist", rk))
            for slot in raw.connect.get(cg, {}):
                keys.append(("tcp_state", "tcp_connect_duration_hist", bs.HistKey(cg, slot, 0)))
        for cg, peer in raw.flows:
            if cg not in dead:
                continue
            if peer == UNTRACKED_PEER:
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


def lookup_batches(
    table: Any, budget: int = BATCH_BYTES, delete: bool = False
) -> Iterator[tuple[Any, Any, int]]:
    """Every entry of a BCC hash table as (keys, values, n) chunks, by BPF_MAP_LOOKUP_BATCH
    with buffers of about `budget` bytes. Each chunk has fresh buffers, so entries stay valid
    after the next chunk is read. Raises OSError with the kernel's errno. With `delete`
    (BPF_MAP_LOOKUP_AND_DELETE_BATCH) each entry returned is also removed, atomically: an
    entry written after its bucket was read stays for the next call.

    Our own loop rather than BCC's: besides the allocation above, BCC 0.26 passes one
    c_uint32 as both the batch token and the count, so a read needing a second call would
    resume at a bucket number that is really an entry count."""
    from bcc.libbcc import lib  # late: importing exporter.kernel.maps must not need BCC

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
        batch = lib.bpf_lookup_and_delete_batch if delete else lib.bpf_lookup_batch
        res = batch(table.map_fd, token_in if started else None, token_out, keys, values, ct.byref(count))
        err = ct.get_errno() if res != 0 else 0
        if err == errno.ENOSPC and count.value == 0 and chunk < table.max_entries:
            # One hash bucket holds more entries than the buffer: grow it and retry.
            chunk = min(int(table.max_entries), chunk * 2)
            continue
        if err not in (0, errno.ENOENT):
            what = "BPF_MAP_LOOKUP_AND_DELETE_BATCH" if delete else "BPF_MAP_LOOKUP_BATCH"
            raise OSError(err, f"{what}: {os.strerror(err)}")
        if count.value:
            yield keys, values, count.value
        if err == errno.ENOENT:  # the kernel's "no more entries"
            return
        ct.memmove(token_in, token_out, ct.sizeof(token_in))
        started = True


def _words(ctype: Any) -> list[bool]:
    """Signedness of each 64-bit word of a per-CPU map's value type, in memory order."""
    if isinstance(ctype, type) and issubclass(ctype, ct.Structure):
        out: list[bool] = []
        for field in getattr(ctype, "_fields_"):  # noqa: B009 - typeshed's type is too narrow
            out += _words(field[1])
        return out
    if isinstance(ctype, type) and issubclass(ctype, ct.Array):
        length: int = getattr(ctype, "_length_")  # noqa: B009
        return _words(getattr(ctype, "_type_")) * length  # noqa: B009
    if ct.sizeof(ctype) != 8:
        raise TypeError(f"per-CPU values must be 64-bit words, not {ctype}")
    return [ctype is ct.c_int64]


def _cpu_sums(values: Any, n: int, ncpu: int, signed: list[bool]) -> list[tuple[int, ...]]:
    """Per entry, each value word summed over CPUs: one strided column per word and CPU,
    added up in C, instead of a ctypes object and attribute read per word, CPU and entry."""
    width = len(signed)
    stride = width * ncpu
    words = memoryview(values).cast("B").cast("Q")
    columns: list[list[int]] = []
    for w, is_signed in enumerate(signed):
        per_cpu = [words[w + c * width : n * stride : stride] for c in range(ncpu)]
        col = per_cpu[0].tolist() if ncpu == 1 else list(map(sum, zip(*per_cpu, strict=True)))
        if is_signed:
            # Summed as unsigned: wrap back to the int64 the kernel's additions meant.
            col = [(v + (1 << 63)) % (1 << 64) - (1 << 63) for v in col]
        columns.append(col)
    return list(zip(*columns, strict=True))


def _int(k: Any) -> int:
    """Scalar keys come back as int from batch lookups and as c_uint64 from items()."""
    return k if isinstance(k, int) else int(k.value)


def _read_hist(items: Iterator[tuple[Any, tuple[int, ...]]], into: dict[int, Slots]) -> int:
    n = 0
    for k, (count, total) in items:
        if count:
            into[k.cgroup_id][k.slot] = (count, total)
        n += 1
    return n
