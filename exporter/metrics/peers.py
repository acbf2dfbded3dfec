"""Who is at the other end of a flow: a pod's workload, this node, or somewhere external.

Only workload-level labels are produced: per-IP labels would make cardinality grow with
every client on the internet.
"""

from __future__ import annotations

import ipaddress
import logging
from pathlib import Path

from exporter.metrics.ledger import LOOPBACK, PeerLabels
from exporter.metrics.raw import UNTRACKED_PEER
from exporter.pods.identity import Identity
from exporter.pods.metadata import PodStore

log = logging.getLogger(__name__)

PEER_POD = "pod"
PEER_NODE = "node"
PEER_EXTERNAL = "external"
PEER_UNKNOWN = "unknown"
"""Bytes the kernel could not attribute to a peer because its flow map was full."""
_UNTRACKED = UNTRACKED_PEER


def peer_address(addr16: bytes) -> str:
    """Kernel flow keys hold IPv4 as v4-mapped IPv6; print the address as users know it."""
    ip = ipaddress.IPv6Address(addr16)
    mapped = ip.ipv4_mapped
    return str(mapped) if mapped is not None else str(ip)


def read_local_addresses(proc: str = "/proc") -> frozenset[str]:
    """This network namespace's own addresses: IPv4 LOCAL routes from fib_trie, IPv6
    from if_inet6. Blocking file reads: call from the poller's thread."""
    addrs: set[str] = set()
    try:
        lines = Path(proc, "net/fib_trie").read_text().splitlines()
    except OSError:
        lines = []
    last_ip = ""
    for line in lines:
        s = line.strip()
        if s.startswith("|--"):
            last_ip = s[3:].strip()
        elif s == "/32 host LOCAL" and last_ip:
            addrs.add(last_ip)
    try:
        v6 = Path(proc, "net/if_inet6").read_text().splitlines()
    except OSError:
        v6 = []
    for line in v6:
        try:
            addrs.add(str(ipaddress.IPv6Address(bytes.fromhex(line.split()[0]))))
        except (IndexError, ValueError):
            continue
    return frozenset(addrs)


_ADDRESS_CACHE = 65536
"""Peers' parsed addresses kept between polls (the same peers recur every poll)."""


NODE_ADDRESSES_MAX_AGE = 30.0


class PeerResolver:
    def __init__(self, store: PodStore) -> None:
        self._store = store
        self.node_addresses: frozenset[str] = frozenset()
        self._addresses_read_at = float("-inf")
        # addr16 -> (printed address, loopback): parsing is most of classify's cost.
        self._addresses: dict[bytes, tuple[str, bool]] = {}

    def refresh_node_addresses(self, now: float, max_age: float = NODE_ADDRESSES_MAX_AGE) -> None:
        """Re-read the node's addresses when the last read is older than `max_age` seconds:
        they rarely change, and fib_trie grows with the routing table (one route per pod on
        some CNIs), so reading it every poll would be I/O repeated for nothing."""
        if now - self._addresses_read_at < max_age:
            return
        self.node_addresses = read_local_addresses()
        self._addresses_read_at = now

    def classify(self, addr16: bytes) -> PeerLabels:
        """(peer_namespace, peer_workload, peer_kind) of an address now; LOOPBACK for
        loopback addresses, whose peer is the flow's owner (loopback_peer)."""
        if addr16 == _UNTRACKED:
            return "", "", PEER_UNKNOWN
        parsed = self._addresses.get(addr16)
        if parsed is None:
            if len(self._addresses) >= _ADDRESS_CACHE:
                self._addresses.clear()  # bounded; refilled within a poll
            ip = peer_address(addr16)
            parsed = self._addresses[addr16] = (ip, ipaddress.ip_address(ip).is_loopback)
        ip, loopback = parsed
        if loopback:
            return LOOPBACK
        pod = self._store.by_ip(ip)
        if pod is not None:
            return pod.namespace, pod.workload, PEER_POD
        if ip in self.node_addresses:
            return "", "", PEER_NODE
        return "", "", PEER_EXTERNAL


def loopback_peer(owner: Identity) -> PeerLabels:
    """Loopback never leaves the owner's network namespace: in a pod that is the pod
    itself, on the host it is the node."""
    if owner.is_pod:
        return owner.namespace, owner.workload, PEER_POD
    return "", "", PEER_NODE
