"""Active connections right from a fresh start: the connections that already exist.

tcp_state.bpf.c counts a connection active from ESTABLISHED to CLOSE; one established
before the program was attached was never seen opening. So, on a fresh start (no pinned
state to continue), before tcp_state is attached, every established socket on the host
is listed through sock_diag (exporter.kernel.sockdiag) and entered in the program's
tcp_socks_seeded map by socket cookie: its close is then counted like any other.

A socket may close between the listing and its entry in the map; the kernel then saw
no entry and counted nothing. settle(), run once the program is attached, lists the
sockets again and deletes the entries of those that are gone: where the delete succeeds
the kernel did not count the close, and the socket is not counted as active; where it
fails, the kernel got there first (and counted the close), so the socket is.

Known limits: a connection established between the listing and the attach (a few
milliseconds) is counted by neither; entering another network namespace needs
CAP_SYS_ADMIN, so without it only the exporter's own namespace is listed (a WARNING
says so, and podnet_exporter_errors_total{stage="seed_connections"} counts the others).
"""

from __future__ import annotations

import ctypes as ct
import logging
from dataclasses import dataclass, field
from typing import Any

from exporter.kernel.bpf_structs import OpenSock
from exporter.kernel.sockdiag import TcpSocket, all_established

log = logging.getLogger(__name__)

PROGRAM = "tcp_state"
MAP = "tcp_socks_seeded"


@dataclass
class ConnectionSeed:
    seeded: dict[int, TcpSocket] = field(default_factory=dict)
    """cookie -> socket entered in tcp_socks_seeded."""
    errors: list[str] = field(default_factory=list)
    table: Any = None
    ran: bool = False

    def before_attach(self, program: str, bcc_obj: Any) -> None:
        """load_programs' hook: runs just before a program that starts afresh is attached."""
        if program != PROGRAM:
            return
        self.ran = True
        self.table = bcc_obj.get_table(MAP.encode(), keytype=ct.c_uint64, leaftype=OpenSock)
        sockets, self.errors = all_established()
        for s in sockets:
            if not s.cgroup_id or not s.cookie:
                continue
            try:
                self.table[ct.c_uint64(s.cookie)] = OpenSock(s.cgroup_id, 1 if s.inbound else 0, 0)
            except Exception as e:  # BCC raises bare Exception when the map is full
                self.errors.append(f"tcp_socks_seeded: {e}")
                break
            self.seeded[s.cookie] = s

    def settle(self) -> dict[int, tuple[int, int]]:
        """cgroup id -> (outbound, inbound) connections open before counting began."""
        if not self.ran or self.table is None:
            return {}
        alive, errors = all_established()
        self.errors += errors
        alive_cookies = {s.cookie for s in alive}
        out: dict[int, tuple[int, int]] = {}
        for cookie, s in self.seeded.items():
            if cookie not in alive_cookies:
                try:
                    del self.table[ct.c_uint64(cookie)]
                    continue  # closed before its entry existed: never counted either way
                except KeyError:
                    pass  # the kernel counted its close: it was active until then
            o, i = out.get(s.cgroup_id, (0, 0))
            out[s.cgroup_id] = (o, i + 1) if s.inbound else (o + 1, i)
        failed = len(self.errors)
        if failed:
            log.warning(
                "could not list the connections of %d network namespace(s) (first: %s): connections opened "
                "there before this fresh start are not counted in podnet_tcp_active_connections (listing "
                "another namespace's sockets needs CAP_SYS_ADMIN); counted in "
                'podnet_exporter_errors_total{stage="seed_connections"}',
                failed,
                self.errors[0],
            )
        log.info(
            "%d connections open before the start are counted as active",
            sum(o + i for o, i in out.values()),
        )
        return out
