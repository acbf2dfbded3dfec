"""Debian's nginx as the benches' server: one worker in the foreground, with its pid, logs
and configuration in a directory of its own."""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def nginx_conf(workdir: str, http: str) -> str:
    """A whole configuration around `http`, the body of its http block."""
    return f"""
worker_processes 1;
daemon off;
pid {workdir}/nginx.pid;
error_log {workdir}/error.log;
events {{ worker_connections 1024; }}
http {{
{http}
}}
"""


def start_nginx(workdir: str, http: str, prefix: Sequence[str] = (), **popen: Any) -> subprocess.Popen[bytes]:
    """nginx with that configuration (written to workdir/nginx.conf); output discarded."""
    Path(workdir, "nginx.conf").write_text(nginx_conf(workdir, http))
    argv = ["nginx", "-p", workdir + "/", "-c", f"{workdir}/nginx.conf", "-e", f"{workdir}/error.log"]
    return subprocess.Popen([*prefix, *argv], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **popen)
