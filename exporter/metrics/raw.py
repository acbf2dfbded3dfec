"""One poll's kernel data as plain Python values: what exporter.kernel.maps produces and the
metric layer (snapshot, lifecycle, peers) consumes, and the codes the BPF programs write.

The codes are a contract with bpf/*.bpf.c (tests compare them with the C source); they live
here so that turning raw data into metrics needs nothing from exporter.kernel.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

Slots = dict[int, tuple[int, int]]
"""kernel histogram slot -> (count, sum in ns)."""
RequestLabels = tuple[int, int, int, int, int]
"""Kernel codes: role, protocol, method, status class, gRPC status + 1."""

UNTRACKED_PEER = bytes(16)
"""Flow key peer of the bytes counted in tcp_flow_overflow (flow map full)."""

# bpf/requests.h codes: index = code.
ROLES = ("", "server", "client")
PROTOCOLS = ("", "other", "http", "http2", "grpc")
HTTP_METHODS = ("", "GET", "POST", "PUT", "DELETE", "HEAD", "PATCH", "OPTIONS", "CONNECT", "TRACE", "other")
GRPC_STATUSES = ("", *(str(code) for code in range(17)))
"""grpc_status label by kernel code (status + 1): bounded to the 17 codes gRPC defines."""
STATUS_CLASSES = ("", "1xx", "2xx", "3xx", "4xx", "5xx")

# Index order of the arrays in TcpConnCounters (DIR_*, FAIL_* in tcp_state.bpf.c).
DIRECTIONS = ("outbound", "inbound")
FAIL_REASONS = ("refused", "timeout", "reset", "other")


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
    flows: dict[tuple[int, Any], tuple[int, int]] = field(default_factory=dict)
    """(owner, peer) -> (sent, received); the peer is a PeerLabels (exporter.metrics.ledger)."""
    rtt: dict[int, Slots] = field(default_factory=lambda: defaultdict(dict))
    connect: dict[int, Slots] = field(default_factory=lambda: defaultdict(dict))
    requests: dict[int, dict[RequestLabels, Slots]] = field(default_factory=lambda: defaultdict(dict))
    """cgroup -> (role, protocol, method, status class codes) -> duration slots (their counts
    are the request counts)."""
    map_failures: dict[str, int] = field(default_factory=dict)
    map_entries: dict[str, int] = field(default_factory=dict)

    def drop(self, owners: Iterable[int]) -> None:
        """Remove everything of these cgroup ids."""
        gone = set(owners)
        for cg in gone:
            self.cgroups.pop(cg, None)
            self.rtt.pop(cg, None)
            self.connect.pop(cg, None)
            self.requests.pop(cg, None)
        for key in [k for k in self.flows if k[0] in gone]:
            del self.flows[key]


FlowSource = tuple[int, bytes, int]
"""A flow's counts as the kernel keeps them: (owner cgroup id, peer address as 16 bytes,
source), where source is the generation of a counter-map entry (>= 0) or minus the id
of a socket's own counters (tp_btf build). A source's peer is classified once, when it
is first read, so its bytes keep the peer they were counted for."""


@dataclass
class Counts:
    """Counts by owner, as read from one set of kernel entries; flows not yet classified."""

    cgroups: dict[int, CgroupCounters] = field(default_factory=lambda: defaultdict(CgroupCounters))
    flows: dict[FlowSource, tuple[int, int]] = field(default_factory=dict)
    rtt: dict[int, Slots] = field(default_factory=lambda: defaultdict(dict))
    connect: dict[int, Slots] = field(default_factory=lambda: defaultdict(dict))
    requests: dict[int, dict[RequestLabels, Slots]] = field(default_factory=lambda: defaultdict(dict))

    def owners(self) -> set[int]:
        ids = set(self.cgroups) | set(self.rtt) | set(self.connect) | set(self.requests)
        return ids | {cg for cg, _, _ in self.flows}


@dataclass
class KernelRead:
    """One poll's read of the kernel maps.

    `final` holds what no program will add to any more (counter-map entries of old
    generations, dead sockets' totals): the reader deletes it from the kernel once the
    poller has added it to its totals and saved them. `live` holds what is still
    counting (the last two generations, live sockets): read again next poll."""

    generation: int = 0
    final: Counts = field(default_factory=Counts)
    live: Counts = field(default_factory=Counts)
    map_failures: dict[str, int] = field(default_factory=dict)
    map_entries: dict[str, int] = field(default_factory=dict)
