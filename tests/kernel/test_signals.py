"""Signals and readiness of the real exporter process.

- SIGTERM at any moment of start-up ends the process at once, also as PID 1 of a PID
  namespace (as in the image), where the kernel drops signals the process has no handler
  for: while it waits for the state lock, and while BCC compiles. The programs it had
  loaded are gone with it.
- SIGHUP is ignored (logged) without a web config.
- A poll that stalls (here: the pods file replaced by a FIFO nobody writes, as a hung
  network filesystem would) turns /readyz to 503 after --ready-stale-polls intervals,
  while /healthz stays 200; when the poll completes, /readyz is 200 again.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest
from exporter_proc import ExporterProcess, new_state_dirs, reset

from exporter.app.checkpoint import StateLock

pytestmark = pytest.mark.kernel

PID1 = ["unshare", "--pid", "--fork", "--kill-child"]
STOP_BOUND = 30.0
"""A failure bound, not a timing assertion: without the fix the exporter waits out the
state lock (120 s) or the compile before it can act on the signal."""


def _child(unshare_pid: int, timeout: float = 30) -> int:
    """The exporter's pid (in our namespace): the child of `unshare --fork`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            children = Path(f"/proc/{unshare_pid}/task/{unshare_pid}/children").read_text().split()
        except OSError:
            children = []
        if children:
            return int(children[0])
        time.sleep(0.02)
    raise TimeoutError("unshare started no child")


def _wait_log(exp: ExporterProcess, text: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in exp.log():
            return
        if exp.proc.poll() is not None:
            raise AssertionError(f"exporter exited before logging {text!r}: {exp.log()}")
        time.sleep(0.02)
    raise TimeoutError(f"no {text!r} in the log: {exp.log()}")


def _prog_ids() -> set[int]:
    """Every BPF program loaded on the host (the tests run one at a time)."""
    out = subprocess.run(["bpftool", "-j", "prog", "show"], capture_output=True, text=True, check=True)
    return {p["id"] for p in json.loads(out.stdout)}


def _term_and_time(exp: ExporterProcess, pid: int) -> float:
    os.kill(pid, signal.SIGTERM)
    sent = time.monotonic()
    try:
        exp.proc.wait(STOP_BOUND)
    except subprocess.TimeoutExpired:
        pytest.fail(f"SIGTERM during start-up did not end the exporter: {exp.log()}")
    return time.monotonic() - sent


def test_sigterm_while_waiting_for_the_state_lock() -> None:
    state = new_state_dirs()
    lock = StateLock(state[1])
    lock.acquire(timeout=0)  # another exporter holds the state: the new one waits up to 120 s
    exp = ExporterProcess([], prefix=PID1, state=state)
    try:
        pid = _child(exp.proc.pid)
        time.sleep(1.0)  # well into the wait (nothing is logged while waiting)
        assert exp.proc.poll() is None, exp.log()
        took = _term_and_time(exp, pid)
        print(f"exited {took:.3f} s after SIGTERM while waiting for the state lock")
        assert exp.proc.returncode == 0, exp.log()
        assert "SIGTERM received during start-up: exiting" in exp.log()
        assert "attached" not in exp.log()
    finally:
        exp.stop()
        lock.release()
        reset(state)


def test_sigterm_while_compiling_leaves_nothing_loaded() -> None:
    before = _prog_ids()
    exp = ExporterProcess(["--pin-dir", "none"], prefix=PID1)
    try:
        pid = _child(exp.proc.pid)
        # Logged by start-up just before the programs are compiled and loaded.
        _wait_log(exp, "--pin-dir none")
        took = _term_and_time(exp, pid)
        print(f"exited {took:.3f} s after SIGTERM during the compile")
        assert exp.proc.returncode == 0, exp.log()
        log = exp.log()
        assert "SIGTERM received during start-up: exiting" in log, log
        assert "serving /metrics" not in log, "the signal came too late to test start-up"
    finally:
        exp.stop()
    assert _prog_ids() <= before, "programs loaded by the stopped exporter are still there"


def test_sigterm_after_start_detaches_without_pins() -> None:
    before = _prog_ids()
    exp = ExporterProcess(["--pin-dir", "none"], prefix=PID1)
    try:
        pid = _child(exp.proc.pid)
        exp.wait_ready()
        assert _prog_ids() - before, "the running exporter has programs loaded"
        # SIGHUP (whose default action ends a process) re-reads only the web config; without
        # one it is logged and ignored.
        os.kill(pid, signal.SIGHUP)
        _wait_log(exp, "SIGHUP ignored")
        exp.wait_ready()
        _term_and_time(exp, pid)
        assert exp.proc.returncode == 0, exp.log()
        assert "eBPF programs detached" in exp.log()
    finally:
        exp.stop()
    assert _prog_ids() <= before


def test_readyz_fails_while_polls_stall_and_recovers() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        pods = Path(tmp) / "pods.json"
        pods.write_text(json.dumps({"kind": "PodList", "apiVersion": "v1", "items": []}))
        interval, stale = 0.5, 3
        exp = ExporterProcess(
            [
                "--pods-file",
                str(pods),
                "--poll-interval",
                str(interval),
                "--ready-stale-polls",
                str(stale),
                "--pin-dir",
                "none",
            ]
        )
        writer: threading.Thread | None = None
        try:
            exp.wait_ready()
            stamp = exp.scrape().value("podnet_exporter_last_poll_timestamp_seconds")
            fifo = Path(tmp) / "pods.fifo"
            os.mkfifo(fifo)
            os.rename(fifo, pods)  # the next poll's reload blocks in open()
            deadline = time.monotonic() + 60
            status, body = 200, b""
            while time.monotonic() < deadline:
                status, _, body = exp.get("/readyz")
                if status == 503:
                    break
                time.sleep(0.1)
            assert status == 503, "readiness did not fail while no poll completed"
            assert b"the last successful poll was" in body, body
            assert exp.get("/healthz")[0] == 200, "liveness must not follow readiness"
            stalled = exp.scrape().value("podnet_exporter_last_poll_timestamp_seconds")
            assert stalled >= stamp

            def feed() -> None:
                body = json.dumps({"kind": "PodList", "apiVersion": "v1", "items": []})
                regular = Path(tmp) / "pods.next"
                regular.write_text(body)
                with open(pods, "w") as f:  # meets the poll's blocked open()
                    # A regular file again before this poll ends, so the next one reads it.
                    os.rename(regular, pods)
                    f.write(body)

            writer = threading.Thread(target=feed, daemon=True)
            writer.start()
            exp.wait_ready(timeout=60)
            assert exp.scrape().value("podnet_exporter_last_poll_timestamp_seconds") > stalled
        finally:
            if writer is None and pods.is_fifo():
                threading.Thread(target=lambda: open(pods, "w").close(), daemon=True).start()
            exp.stop()
