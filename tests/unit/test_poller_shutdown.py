"""Poller.run on shutdown: cancelling it waits for the poll in flight, because the worker
thread reads the programs' mapped counters and the programs are closed right after."""

from __future__ import annotations

import asyncio
import threading
from collections import Counter

import pytest

from exporter.app.poller import Poller
from exporter.export.http_app import SnapshotStore
from exporter.export.prometheus import Exposition
from exporter.metrics.model import BucketLayout


class BlockedPoller(Poller):
    def __init__(self) -> None:  # only what run() uses: no kernel, no pods
        self.interval = 0.01
        self.errors = Counter()
        self._logged = set()
        self.started = threading.Event()
        self.release = threading.Event()
        self.finished = False
        self.snapshots = SnapshotStore(Exposition(BucketLayout(0)))

    def poll_once(self):  # type: ignore[no-untyped-def]
        self.started.set()
        self.release.wait(timeout=30)
        self.finished = True
        raise RuntimeError("no snapshot in this test")


def test_cancel_waits_for_the_poll_in_flight() -> None:
    async def scenario() -> None:
        p = BlockedPoller()
        task = asyncio.create_task(p.run())
        await asyncio.to_thread(p.started.wait, 30)
        task.cancel()
        for _ in range(20):
            await asyncio.sleep(0)
        assert not task.done(), "run() ended while its worker thread was still reading"
        p.release.set()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert p.finished

    asyncio.run(scenario())
