"""Reading the kernel maps into plain Python data, one pass per poll.

Blocking (bpf syscalls): called from the poller's worker thread only.
"""

from __future__ import annotations

import ctypes as ct
import errno
import functools
import logging
import os
import struct
from collections.abc import Iterator
from typing import Any

from exporter.kernel import bpf_structs as bs
from exporter.kernel.programs import LoadedPrograms
from exporter.kernel.sockbytes import SocketTotals, read_slots, socket_counts
from exporter.metrics.raw import UNTRACKED_PEER, Counts, FlowSource, KernelRead, Slots

log = logging.getLogger(__name__)


class MapReader:
    """Knows which map feeds which field; remembers whether batch operations work.

    Each poll advances the generation (podnet_gen, bpf/podnet.h), reads every counter
    map and splits its entries: those of generations at least two behind are final,
    the rest still counting. The final entries and the dead sockets' totals are deleted
    by delete_final(), which the poller calls once it has added them to its totals and
    saved those: a restart in between finds them again and skips what was saved."""

    def __init__(self, programs: LoadedPrograms) -> None:
        self._programs = programs
        self._batch_ok: dict[str, bool] = {}
        self._delete: list[tuple[str, Any, Any, int]] = []
        """(map name, table, keys array, count) to delete once the poll's totals are saved."""
        self.generation = self._kernel_generation()

    def _kernel_generation(self) -> int:
        """The generation the programs count in now: pinned maps carry it over a restart."""
        gens = [0]
        for program in self._programs.objects:
            table = self._programs.table(program, "podnet_gen")
            if table is not None:
                gens.append(int(table[ct.c_uint32(0)].value))
        return max(gens)

    def advance(self) -> int:
        """Start a new generation; returns it. Every program's podnet_gen is set alike."""
        self.generation += 1
        for program in self._programs.objects:
            table = self._programs.table(program, "podnet_gen")
            if table is not None:
                table[ct.c_uint32(0)] = ct.c_uint32(self.generation & _U32)
        return self.generation

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

    def _entries(
        self, program: str, name: str, committed_through: int, read: KernelRead
    ) -> Iterator[tuple[tuple[Any, ...], tuple[int, ...], bool]]:
        """(key fields, value words summed over CPUs, final) of every entry of a per-CPU
        counter map whose key has a `gen`: the key's fields flattened in memory order
        (key_format), the value's words likewise (arrays flattened). Entries of
        generations up to `committed_through` were counted before a restart: they are only
        deleted. Final ones are queued for delete_final()."""
        table = self._programs.table(program, name)
        if table is None:
            return
        read.map_entries[name] = 0
        ncpu, signed = table.total_cpu, _words(table.sLeaf)
        chunks = self._chunks(name, table)
        if chunks is None:
            items = list(table.items())
            if not items:
                return
            keys = (table.Key * len(items))(*(k for k, _ in items))
            values = (table.Leaf * len(items))(*(v for _, v in items))
            chunks = [(keys, values, len(items))]
        fmt, gen_at = key_format(table.Key)
        size = ct.sizeof(table.Key)
        now = read.generation
        for keys, values, n in chunks:
            raw = memoryview(keys).cast("B")[: n * size]
            gone = []
            for i, (key, words) in enumerate(
                zip(struct.iter_unpack(fmt, raw), _cpu_sums(values, n, ncpu, signed), strict=True)
            ):
                # The kernel's generation is a u32: an entry's age is taken modulo 2^32.
                age = (now - key[gen_at]) & _U32
                if age < 2:
                    yield key, words, False
                    continue
                gone.append(raw[i * size : (i + 1) * size])
                if now - age > committed_through:
                    yield key, words, True
            read.map_entries[name] += n
            if gone:
                batch = (table.Key * len(gone)).from_buffer_copy(b"".join(gone))
                self._delete.append((name, table, batch, len(gone)))

    def read(
        self, committed_through: int = -1, committed_sockets: frozenset[int] = frozenset()
    ) -> KernelRead:
        """Advance the generation and read everything. `committed_through` and
        `committed_sockets` say what the saved totals already hold (after a restart)."""
        read = KernelRead(generation=self.advance())
        p = self._programs
        if p.attached("tcp_traffic"):
            for k, (sent, received), final in self._entries(
                "tcp_traffic", "tcp_flow_bytes", committed_through, read
            ):
                # Key: cgroup id, peer, gen, pad.
                _add_flow(read.final if final else read.live, (k[0], k[1], k[2]), sent, received)
            for k, (sent, received), final in self._entries(
                "tcp_traffic", "tcp_flow_overflow", committed_through, read
            ):
                # Key: cgroup id, gen, pad.
                _add_flow(read.final if final else read.live, (k[0], UNTRACKED_PEER, k[1]), sent, received)
            self._read_sockets(read, committed_sockets)
            for k, (count, total), final in self._entries(
                "tcp_traffic", "tcp_rtt_hist", committed_through, read
            ):
                _add_slot(
                    (read.final if final else read.live).rtt[k[0]], k[1], count, total
                )  # cgroup id, slot, gen
            for k, (count, total), final in self._entries(
                "tcp_traffic", "request_hist", committed_through, read
            ):
                # Key: cgroup id, role, protocol, method, status class, slot, gen, gRPC status, pad[3].
                part = read.final if final else read.live
                _add_slot(part.requests[k[0]].setdefault((*k[1:5], k[7]), {}), k[5], count, total)
        if p.attached("tcp_state"):
            for k, w, final in self._entries("tcp_state", "tcp_conn_by_cgroup", committed_through, read):
                # Words: opened[2], closed[2], active[2], failed[4].
                c = (read.final if final else read.live).cgroups[k[0]]
                for i in range(2):
                    c.opened[i] += w[i]
                    c.closed[i] += w[2 + i]
                    c.active[i] += w[4 + i]
                for i in range(4):
                    c.failed[i] += w[6 + i]
            for k, (count, total), final in self._entries(
                "tcp_state", "tcp_connect_duration_hist", committed_through, read
            ):
                _add_slot((read.final if final else read.live).connect[k[0]], k[1], count, total)
            for name in ("tcp_connects_pending", "tcp_socks_open", "tcp_socks_seeded"):
                read.map_entries[name] = self._count("tcp_state", name)
        if p.attached("tcp_events"):
            for k, (retransmits, resets_sent, resets_received), final in self._entries(
                "tcp_events", "tcp_events_by_cgroup", committed_through, read
            ):
                c = (read.final if final else read.live).cgroups[k[0]]
                c.retransmits += retransmits
                c.resets_sent += resets_sent
                c.resets_received += resets_received
        for program, map_names in bs.MAP_IDS.items():
            table = p.table(program, "map_update_failures")
            if table is None:
                continue
            for idx, per_cpu in table.items():
                if _int(idx) < len(map_names):
                    read.map_failures[map_names[_int(idx)]] = sum(int(v) for v in per_cpu)
        return read

    def _count(self, program: str, name: str) -> int:
        """Entries in a map, without decoding them."""
        table = self._programs.table(program, name)
        if table is None:
            return 0
        chunks = self._chunks(name, table)
        if chunks is not None:
            return sum(n for _, _, n in chunks)
        return sum(1 for _ in table)

    def _read_sockets(self, read: KernelRead, committed: frozenset[int]) -> None:
        """The tp_btf build's per-socket counters: live sockets first, then the totals of
        sockets that died (final; deleted by delete_final). A socket found in both was
        handed over while this poll read it: its final totals count, once."""
        slots = self._programs.socket_slot_array("tcp_traffic")
        if slots is None:
            return
        table = self._programs.table("tcp_traffic", "tcp_sock_final")
        ids = self._programs.table("tcp_traffic", "tcp_sock_ids")
        if table is None or ids is None:
            return
        live = read_slots(slots.elements, ids[ct.c_uint32(0)].slots_taken)
        finals: list[SocketTotals] = []
        gone: list[int] = []
        for keys, values, n in lookup_batches(table):
            for i, v in enumerate(values[:n]):
                sid = int(keys[i])
                gone.append(sid)
                finals.append(SocketTotals(sid, (v.flow.cgroup_id, bytes(v.flow.peer)), v.sent, v.received))
        if gone:
            self._delete.append(("tcp_sock_final", table, (table.Key * len(gone))(*gone), len(gone)))
        pieces, final = socket_counts(live, finals, committed)
        read.live.flows.update(pieces)
        read.final.flows.update(final)
        read.map_entries["tcp_sock_slots"] = len(live)
        read.map_entries["tcp_sock_final"] = len(gone)

    def delete_final(self) -> int:
        """Delete what the last read() found final; returns entries deleted."""
        deleted = 0
        pending, self._delete = self._delete, []
        for name, table, keys, n in pending:
            deleted += delete_keys(name, table, keys, n, self._batch_ok)
        return deleted


def delete_keys(map_name: str, table: Any, keys: Any, n: int, batch_ok: dict[str, bool]) -> int:
    """Delete `n` keys: one BPF_MAP_DELETE_BATCH, else one syscall each."""
    from bcc.libbcc import lib  # late: importing exporter.kernel.maps must not need BCC

    name = f"delete:{map_name}"
    if batch_ok.get(name, True):
        count = ct.c_uint32(n)
        if lib.bpf_delete_batch(table.map_fd, keys, ct.byref(count)) == 0:
            batch_ok[name] = True
            return n
        err = ct.get_errno()
        if err not in _BATCH_UNSUPPORTED:
            raise OSError(err, f"BPF_MAP_DELETE_BATCH on {map_name}: {os.strerror(err)}")
        batch_ok[name] = False
        log.info("batch deletes unavailable for map %s; deleting entry by entry", map_name)
    deleted = 0
    for i in range(n):
        try:
            del table[keys[i]]
            deleted += 1
        except KeyError:
            pass
    return deleted


def _add_flow(part: Counts, flow: FlowSource, sent: int, received: int) -> None:
    s0, r0 = part.flows.get(flow, (0, 0))
    part.flows[flow] = (s0 + sent, r0 + received)


def _add_slot(slots: Slots, slot: int, count: int, total: int) -> None:
    if count:
        c0, t0 = slots.get(slot, (0, 0))
        slots[slot] = (c0 + count, t0 + total)


_U32 = 0xFFFFFFFF
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


_CODES = {ct.c_uint64: "Q", ct.c_int64: "q", ct.c_uint32: "I", ct.c_uint16: "H", ct.c_uint8: "B"}


@functools.cache
def key_format(ctype: Any) -> tuple[str, int]:
    """(struct format of a key type, flattened in memory order, byte arrays as bytes;
    index of its `gen` field), derived from the one ctypes mirror of the layout."""
    codes: list[str] = []
    gen_at = -1

    def walk(t: Any) -> None:
        nonlocal gen_at
        for name, ftype in t._fields_:
            if isinstance(ftype, type) and issubclass(ftype, ct.Structure):
                walk(ftype)
            elif isinstance(ftype, type) and issubclass(ftype, ct.Array):
                codes.append(f"{ftype._length_}s")
            else:
                if name == "gen":
                    gen_at = len(codes)
                codes.append(_CODES[ftype])

    walk(ctype)
    fmt = "<" + "".join(codes)
    if struct.calcsize(fmt) != ct.sizeof(ctype):
        raise TypeError(f"{ctype.__name__} has padding a struct format cannot express")
    return fmt, gen_at


def _int(k: Any) -> int:
    """Scalar keys come back as int from batch lookups and as c_uint64 from items()."""
    return k if isinstance(k, int) else int(k.value)
