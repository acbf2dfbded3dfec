"""ctypes mirrors of the eBPF maps' key and value structs (bpf/*.bpf.c, bpf/podnet.h).

This is the only place the layouts are written down on the Python side; tests compare
each against the layout BCC derives from the C source. The values the C writes into them
(histogram slot layout, request codes, the untracked-peer key) are metric-side contracts:
exporter.metrics.histogram and exporter.metrics.raw.
"""

from __future__ import annotations

import ctypes as ct
from typing import Any


class TcpBytes(ct.Structure):
    _fields_ = [("sent", ct.c_uint64), ("received", ct.c_uint64)]


class TcpFlowKey(ct.Structure):
    _fields_ = [("cgroup_id", ct.c_uint64), ("peer", ct.c_uint8 * 16)]


class TcpConnCounters(ct.Structure):
    _fields_ = [
        ("opened", ct.c_uint64 * 2),
        ("closed", ct.c_uint64 * 2),
        ("active", ct.c_int64 * 2),
        ("failed", ct.c_uint64 * 4),
    ]


class TcpEventCounters(ct.Structure):
    _fields_ = [("retransmits", ct.c_uint64), ("resets_sent", ct.c_uint64), ("resets_received", ct.c_uint64)]


class HistKey(ct.Structure):
    _fields_ = [("cgroup_id", ct.c_uint64), ("slot", ct.c_uint32), ("gen", ct.c_uint32)]


class CgroupGenKey(ct.Structure):
    """Key of the per-owner counter maps (podnet_cgroup_key)."""

    _fields_ = [("cgroup_id", ct.c_uint64), ("gen", ct.c_uint32), ("pad", ct.c_uint32)]


class TcpFlowGenKey(ct.Structure):
    _fields_ = [("flow", TcpFlowKey), ("gen", ct.c_uint32), ("pad", ct.c_uint32)]


class RequestKey(ct.Structure):
    _fields_ = [
        ("cgroup_id", ct.c_uint64),
        ("role", ct.c_uint8),
        ("protocol", ct.c_uint8),
        ("method", ct.c_uint8),
        ("status_class", ct.c_uint8),
        ("slot", ct.c_uint32),
        ("gen", ct.c_uint32),
        ("grpc_status", ct.c_uint8),
        ("pad", ct.c_uint8 * 3),
    ]


class SockInfo(ct.Structure):
    _fields_ = [
        ("flow", TcpFlowKey),
        ("turn_start_ns", ct.c_uint64),
        ("role", ct.c_uint8),
        ("in_request", ct.c_uint8),
        ("method", ct.c_uint8),
        ("flags", ct.c_uint8),
        ("slot", ct.c_uint32),
        ("last_rtt_ns", ct.c_uint64),
        ("id", ct.c_uint64),
    ]


class TcpSockFinal(ct.Structure):
    """A dead socket's byte totals (tp_btf build), keyed by its state's id."""

    _fields_ = [("flow", TcpFlowKey), ("sent", ct.c_uint64), ("received", ct.c_uint64)]


class TcpSockSlot(ct.Structure):
    """A live socket's byte counters in tcp_sock_slots (tp_btf build); id 0: a free slot."""

    _fields_ = [("id", ct.c_uint64), ("flow", TcpFlowKey), ("sent", ct.c_uint64), ("received", ct.c_uint64)]


class TcpSockIds(ct.Structure):
    """tcp_sock_ids[0] (tp_btf build): the last socket id given out and the slots of
    tcp_sock_slots ever taken (the high-water mark below which live sockets are)."""

    _fields_ = [("last_id", ct.c_uint64), ("slots_taken", ct.c_uint64)]


class HistVal(ct.Structure):
    _fields_ = [("count", ct.c_uint64), ("sum_ns", ct.c_uint64)]


class ConnectStart(ct.Structure):
    _fields_ = [("start_ns", ct.c_uint64), ("cgroup_id", ct.c_uint64)]


class OpenSock(ct.Structure):
    _fields_ = [("cgroup_id", ct.c_uint64), ("direction", ct.c_uint32), ("pad", ct.c_uint32)]


CgroupKey = ct.c_uint64
SockKey = ct.c_uint64
FailureCount = ct.c_uint64

# map name -> (key type, value type); the map-update-failure index of each program's maps
# is its position in that program's MAP_IDS tuple (PODNET_MAPID_* in the C source).
MAP_TYPES: dict[str, tuple[type[Any], type[Any]]] = {
    "tcp_sock_identity": (SockKey, SockInfo),
    "tcp_sock_final": (ct.c_uint64, TcpSockFinal),
    "tcp_sock_slots": (ct.c_uint32, TcpSockSlot),
    "tcp_sock_ids": (ct.c_uint32, TcpSockIds),
    "request_hist": (RequestKey, HistVal),
    "tcp_flow_bytes": (TcpFlowGenKey, TcpBytes),
    "tcp_flow_overflow": (CgroupGenKey, TcpBytes),
    "tcp_conn_by_cgroup": (CgroupGenKey, TcpConnCounters),
    "tcp_connects_pending": (SockKey, ConnectStart),
    "tcp_socks_open": (SockKey, OpenSock),
    "tcp_socks_seeded": (ct.c_uint64, OpenSock),
    "tcp_connect_duration_hist": (HistKey, HistVal),
    "tcp_events_by_cgroup": (CgroupGenKey, TcpEventCounters),
    "podnet_gen": (ct.c_uint32, ct.c_uint32),
    "tcp_rtt_hist": (HistKey, HistVal),
    "map_update_failures": (ct.c_uint32, FailureCount),
}

MAP_IDS: dict[str, tuple[str, ...]] = {
    "tcp_traffic": (
        "tcp_flow_bytes",
        "tcp_rtt_hist",
        "request_hist",
        "tcp_flow_overflow",
        "tcp_sock_state",
        "tcp_sock_final",
        "tcp_sock_slots",
        "h2_conn_dirs",
        "h2_streams_open",
        "h2_walk",
    ),
    "tcp_state": (
        "tcp_conn_by_cgroup",
        "tcp_connects_pending",
        "tcp_socks_open",
        "tcp_connect_duration_hist",
    ),
    "tcp_events": ("tcp_events_by_cgroup",),
}
