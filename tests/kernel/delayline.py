"""A delay line between two network namespaces: each holds a TUN device, and a relay
process copies IP packets from one to the other after D milliseconds (no netem here).

    nsA: tun <addr_a>  --(relay, +D ms)-->  nsB: tun <addr_b>
         and back, +D ms: round trip = 2 D.

Run as a script: python delayline.py NS_A NS_B DELAY_MS READY_FILE
(the TUN devices must exist: see `setup()`).
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import heapq
import os
import select
import struct
import subprocess
import sys
import time

TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
CLONE_NEWNET = 0x40000000


def setup(ns_a: str, ns_b: str, dev: str, addr_a: str, addr_b: str) -> None:
    """Create a persistent TUN named `dev` in each namespace, routed to the other side."""
    for ns, mine, theirs in ((ns_a, addr_a, addr_b), (ns_b, addr_b, addr_a)):
        for cmd in (
            f"ip tuntap add dev {dev} mode tun",
            f"ip addr add {mine}/32 dev {dev}",
            f"ip link set {dev} up",
            f"ip route add {theirs}/32 dev {dev}",
        ):
            subprocess.run(["ip", "netns", "exec", ns, *cmd.split()], check=True)


def _setns(name: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns {name}")
    finally:
        os.close(fd)


def _open_tun(dev: str) -> int:
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", dev.encode(), IFF_TUN | IFF_NO_PI))
    return fd


def relay(ns_a: str, ns_b: str, dev: str, delay_ms: float, ready_file: str, max_seconds: float = 300) -> None:
    # A TUN fd stays bound to the namespace it was attached in, so one process can serve both.
    _setns(ns_a)
    fd_a = _open_tun(dev)
    _setns(ns_b)
    fd_b = _open_tun(dev)
    other = {fd_a: fd_b, fd_b: fd_a}
    pending: list[tuple[float, int, int, bytes]] = []
    seq = 0
    delay = delay_ms / 1000
    open(ready_file, "w").close()
    deadline = time.monotonic() + max_seconds
    while time.monotonic() < deadline:
        timeout = max(0.0, pending[0][0] - time.monotonic()) if pending else 0.5
        readable, _, _ = select.select([fd_a, fd_b], [], [], timeout)
        now = time.monotonic()
        for fd in readable:
            while True:
                try:
                    pkt = os.read(fd, 65536)
                except BlockingIOError:
                    break
                seq += 1
                heapq.heappush(pending, (now + delay, seq, other[fd], pkt))
        now = time.monotonic()
        while pending and pending[0][0] <= now:
            _, _, out, pkt = heapq.heappop(pending)
            with contextlib.suppress(OSError):
                os.write(out, pkt)


if __name__ == "__main__":
    relay(sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4]), sys.argv[5])
