"""Tests for exporter.metrics.peers: flow peer addresses, local addresses, peer classification."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from exporter.metrics import peers as peers_module
from exporter.metrics.ledger import LOOPBACK
from exporter.metrics.peers import (
    PEER_EXTERNAL,
    PEER_NODE,
    PEER_POD,
    PeerResolver,
    loopback_peer,
    peer_address,
    read_local_addresses,
)
from exporter.pods.identity import Identity
from exporter.pods.metadata import PodStore
from exporter.pods.pods import PodMeta


def v4(addr: str) -> bytes:
    return ipaddress.IPv6Address("::ffff:" + addr).packed


def v6(addr: str) -> bytes:
    return ipaddress.IPv6Address(addr).packed


# ---- peer_address ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("addr16", "text"),
    [
        (v4("10.244.1.17"), "10.244.1.17"),
        (v4("127.0.0.1"), "127.0.0.1"),
        (v4("0.0.0.0"), "0.0.0.0"),
        (v4("255.255.255.255"), "255.255.255.255"),
        (bytes(10) + b"\xff\xff" + bytes([192, 168, 0, 1]), "192.168.0.1"),
        (v6("::1"), "::1"),
        (v6("fd00:10:244::5"), "fd00:10:244::5"),
        (v6("2001:0db8:0000:0000:0000:0000:0000:0001"), "2001:db8::1"),
        (v6("fe80::211:22ff:fe33:4455"), "fe80::211:22ff:fe33:4455"),
        (bytes(16), "::"),
        # IPv4-compatible (deprecated ::a.b.c.d) is not v4-mapped: stays IPv6.
        (bytes(12) + bytes([10, 0, 0, 1]), "::a00:1"),
    ],
)
def test_peer_address(addr16: bytes, text: str) -> None:
    assert peer_address(addr16) == text


@settings(deadline=None)
@given(st.binary(min_size=16, max_size=16))
def test_peer_address_round_trips(addr16: bytes) -> None:
    text = peer_address(addr16)
    ip = ipaddress.ip_address(text)
    if ip.version == 4:
        assert addr16[:12] == bytes(10) + b"\xff\xff"
        assert ip.packed == addr16[12:]
    else:
        assert ip.packed == addr16
        assert ip.ipv4_mapped is None
    assert text == str(ip), "canonical text, comparable with pod IPs"


@settings(deadline=None)
@given(st.ip_addresses(v=4))
def test_peer_address_v4(ip: ipaddress.IPv4Address) -> None:
    assert peer_address(v4(str(ip))) == str(ip)


@pytest.mark.parametrize("bad", [b"", bytes(4), bytes(15), bytes(17)])
def test_peer_address_rejects_wrong_lengths(bad: bytes) -> None:
    with pytest.raises(ValueError):
        peer_address(bad)


# ---- read_local_addresses ---------------------------------------------------------------

FIB_TRIE = """\
Main:
  +-- 0.0.0.0/0 3 0 5
     |-- 0.0.0.0
        /0 universe UNICAST
     +-- 10.0.0.0/24 2 0 2
        +-- 10.0.0.0/28 2 0 2
           |-- 10.0.0.0
              /24 link UNICAST
           |-- 10.0.0.11
              /32 host LOCAL
        |-- 10.0.0.255
           /32 link BROADCAST
     +-- 127.0.0.0/8 2 0 2
        +-- 127.0.0.0/31 1 0 0
           |-- 127.0.0.0
              /8 host LOCAL
           |-- 127.0.0.1
              /32 host LOCAL
        |-- 127.255.255.255
           /32 link BROADCAST
     |-- 172.17.0.1
        /32 host LOCAL
     |-- 10.244.1.0
        /24 link UNICAST
Local:
  +-- 0.0.0.0/0 3 0 5
     |-- 10.0.0.11
        /32 host LOCAL
     |-- 127.0.0.1
        /32 host LOCAL
     |-- 172.17.0.1
        /32 host LOCAL
"""

IF_INET6 = """\
00000000000000000000000000000001 01 80 10 80       lo
fe80000000000000021122fffe334455 02 40 20 80     eth0
20010db8000000000000000000000011 02 40 00 80     eth0
"""


def write_proc(root: Path, fib_trie: str | None, if_inet6: str | None) -> str:
    (root / "net").mkdir(parents=True, exist_ok=True)
    if fib_trie is not None:
        (root / "net" / "fib_trie").write_text(fib_trie)
    if if_inet6 is not None:
        (root / "net" / "if_inet6").write_text(if_inet6)
    return str(root)


def test_read_local_addresses(tmp_path: Path) -> None:
    addrs = read_local_addresses(proc=write_proc(tmp_path, FIB_TRIE, IF_INET6))
    assert addrs == frozenset(
        {"10.0.0.11", "127.0.0.1", "172.17.0.1", "::1", "fe80::211:22ff:fe33:4455", "2001:db8::11"}
    )
    # Broadcast, network and route entries are not addresses of this host.
    for not_local in ("10.0.0.255", "10.0.0.0", "127.0.0.0", "0.0.0.0", "10.244.1.0", "127.255.255.255"):
        assert not_local not in addrs


def test_read_local_addresses_ipv4_only(tmp_path: Path) -> None:
    addrs = read_local_addresses(proc=write_proc(tmp_path, FIB_TRIE, None))
    assert addrs == frozenset({"10.0.0.11", "127.0.0.1", "172.17.0.1"})


def test_read_local_addresses_ipv6_only(tmp_path: Path) -> None:
    addrs = read_local_addresses(proc=write_proc(tmp_path, None, IF_INET6))
    assert addrs == frozenset({"::1", "fe80::211:22ff:fe33:4455", "2001:db8::11"})


def test_read_local_addresses_without_files(tmp_path: Path) -> None:
    assert read_local_addresses(proc=str(tmp_path / "nope")) == frozenset()
    assert read_local_addresses(proc=write_proc(tmp_path, "", "")) == frozenset()


def test_read_local_addresses_are_comparable_with_peer_addresses(tmp_path: Path) -> None:
    addrs = read_local_addresses(proc=write_proc(tmp_path, FIB_TRIE, IF_INET6))
    assert peer_address(v4("10.0.0.11")) in addrs
    assert peer_address(v6("2001:db8::11")) in addrs


# ---- PeerResolver.classify --------------------------------------------------------------

UID_WEB = "5f1d3c1e-8a2b-4c3d-9e4f-0123456789ab"
UID_DB = "9a9b9c9d-0000-4111-8222-333344445555"
UID_PROXY = "c0ffee00-1111-4222-8333-444455556666"
NODE_IP = "10.0.0.11"


def pod(
    uid: str, ns: str, name: str, workload: str, kind: str, ips: tuple[str, ...], host: bool = False
) -> PodMeta:
    return PodMeta(uid, ns, name, "node-a", workload, kind, ips, host, ())


WEB_POD = pod(UID_WEB, "shop", "web-1", "web", "Deployment", ("10.244.1.17", "fd00:10:244:1::17"))
DB_POD = pod(UID_DB, "data", "db-0", "db", "StatefulSet", ("10.244.2.5",))
# A hostNetwork pod whose (hand-made) metadata still lists the node's IP.
PROXY_POD = pod(UID_PROXY, "kube-system", "kube-proxy-x", "kube-proxy", "DaemonSet", (NODE_IP,), host=True)

WEB = Identity("shop", "web-1", "nginx", "web", "Deployment", UID_WEB)
DB = Identity("data", "db-0", "pg", "db", "StatefulSet", UID_DB)
UNKNOWN_POD = Identity("", UID_DB, "", "", "", UID_DB)
HOST = Identity("", "", "nginx.service", "", "")


@pytest.fixture
def peers() -> PeerResolver:
    store = PodStore()
    store.replace_all({p.uid: p for p in (WEB_POD, DB_POD, PROXY_POD)})
    r = PeerResolver(store)
    r.node_addresses = frozenset({NODE_IP, "127.0.0.1", "::1", "2001:db8::11"})
    return r


def classify(resolver: PeerResolver, addr16: bytes, owner: Identity) -> tuple[str, str, str]:
    """What a flow's peer labels end up as: classified when read, loopback named after
    its owner when the snapshot is built."""
    labels = resolver.classify(addr16)
    return loopback_peer(owner) if labels == LOOPBACK else labels


CLASSIFY_CASES: list[tuple[str, bytes, Identity, tuple[str, str, str]]] = [
    ("v4 loopback in a pod is the pod itself", v4("127.0.0.1"), WEB, ("shop", "web", PEER_POD)),
    ("other 127/8 address in a pod", v4("127.0.0.53"), WEB, ("shop", "web", PEER_POD)),
    ("v6 loopback in a pod", v6("::1"), WEB, ("shop", "web", PEER_POD)),
    ("loopback in a pod without metadata", v4("127.0.0.1"), UNKNOWN_POD, ("", "", PEER_POD)),
    ("v4 loopback on the host is the node", v4("127.0.0.1"), HOST, ("", "", PEER_NODE)),
    ("v6 loopback on the host", v6("::1"), HOST, ("", "", PEER_NODE)),
    ("pod IP", v4("10.244.2.5"), WEB, ("data", "db", PEER_POD)),
    ("pod IP seen from the host", v4("10.244.2.5"), HOST, ("data", "db", PEER_POD)),
    ("own pod IP", v4("10.244.1.17"), WEB, ("shop", "web", PEER_POD)),
    ("pod IPv6", v6("fd00:10:244:1::17"), DB, ("shop", "web", PEER_POD)),
    ("node address", v4(NODE_IP), WEB, ("", "", PEER_NODE)),
    ("node IPv6 address", v6("2001:db8::11"), WEB, ("", "", PEER_NODE)),
    ("hostNetwork pod never matches by IP", v4(NODE_IP), HOST, ("", "", PEER_NODE)),
    ("external v4", v4("93.184.216.34"), WEB, ("", "", PEER_EXTERNAL)),
    ("external v6", v6("2606:2800:220:1::1"), WEB, ("", "", PEER_EXTERNAL)),
    ("unknown cluster IP", v4("10.244.9.9"), WEB, ("", "", PEER_EXTERNAL)),
]


@pytest.mark.parametrize(
    ("addr16", "owner", "expected"),
    [(a, o, e) for _, a, o, e in CLASSIFY_CASES],
    ids=[c[0] for c in CLASSIFY_CASES],
)
def test_classify(
    peers: PeerResolver, addr16: bytes, owner: Identity, expected: tuple[str, str, str]
) -> None:
    assert classify(peers, addr16, owner) == expected


def test_host_network_pod_ip_is_not_indexed() -> None:
    store = PodStore()
    store.replace_all({PROXY_POD.uid: PROXY_POD})
    r = PeerResolver(store)
    assert store.by_ip(NODE_IP) is None
    # Not a node address either (none known yet): external, never the hostNetwork pod.
    assert classify(r, v4(NODE_IP), WEB) == ("", "", PEER_EXTERNAL)


def test_classify_follows_store_updates(peers: PeerResolver) -> None:
    new_ip = v4("10.244.9.9")
    assert classify(peers, new_ip, WEB)[2] == PEER_EXTERNAL
    peers._store.upsert(pod("d00d0000-1111-4222-8333-444455556666", "x", "y", "y", "Pod", ("10.244.9.9",)))
    assert classify(peers, new_ip, WEB) == ("x", "y", PEER_POD)


def test_node_addresses_start_empty() -> None:
    r = PeerResolver(PodStore())
    assert r.node_addresses == frozenset()
    assert classify(r, v4("10.0.0.11"), WEB) == ("", "", PEER_EXTERNAL)
    assert classify(r, v4("127.0.0.1"), HOST) == ("", "", PEER_NODE)


def test_untracked_flow_key_is_unknown(peers: PeerResolver) -> None:
    # The kernel files bytes it could not give a flow entry (map full) under the all-zero peer.
    unknown = getattr(peers_module, "PEER_UNKNOWN", None)
    if unknown is None:
        pytest.skip("this version has no untracked-peer key")
    assert classify(peers, bytes(16), WEB) == ("", "", unknown)
    assert classify(peers, bytes(16), HOST) == ("", "", unknown)


@settings(deadline=None)
@given(st.ip_addresses().filter(lambda ip: ip.packed != bytes(16)))
def test_classify_always_returns_a_known_kind(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> None:
    store = PodStore()
    store.replace_all({p.uid: p for p in (WEB_POD, DB_POD, PROXY_POD)})
    r = PeerResolver(store)
    addr16 = v4(str(ip)) if ip.version == 4 else ip.packed
    for owner in (WEB, HOST):
        ns, workload, kind = classify(r, addr16, owner)
        assert kind in (PEER_POD, PEER_NODE, PEER_EXTERNAL)
        if kind != PEER_POD:
            assert (ns, workload) == ("", "")


def test_node_addresses_are_reread_only_when_stale(monkeypatch: pytest.MonkeyPatch) -> None:
    reads: list[int] = []

    def fake_read() -> frozenset[str]:
        reads.append(1)
        return frozenset({f"10.0.0.{len(reads)}"})

    monkeypatch.setattr("exporter.metrics.peers.read_local_addresses", fake_read)
    r = PeerResolver(PodStore())
    r.refresh_node_addresses(100.0, max_age=30)
    r.refresh_node_addresses(120.0, max_age=30)
    assert len(reads) == 1 and r.node_addresses == {"10.0.0.1"}
    r.refresh_node_addresses(131.0, max_age=30)
    assert len(reads) == 2 and r.node_addresses == {"10.0.0.2"}
