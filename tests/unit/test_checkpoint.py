"""exporter.app.checkpoint: totals saved atomically, used only with the pins they belong to."""

from __future__ import annotations

import logging
import marshal
import os
from pathlib import Path
from typing import Any

import pytest

from exporter.app import checkpoint as cp
from exporter.app.checkpoint import Checkpoint, SavedState, StateLock, StateLockError
from exporter.metrics.ledger import Ledger
from exporter.metrics.lifecycle import Retired
from exporter.metrics.raw import CgroupCounters
from exporter.pods.identity import Identity

GEN_MAPS = (101, 102, 103)


def state() -> SavedState:
    ledger = Ledger()
    ledger.totals.cgroups[7] = CgroupCounters(sent=5, active=[1, 0])
    ledger.totals.flows[(7, ("shop", "db", "pod"))] = (5, 0)
    ledger.committed_through = 41
    retired = Retired(max_identities=10)
    syn = retired._id_for(Identity("shop", "web-1", "app", "web", "Deployment", "uid-1"))
    assert syn is not None
    retired.data.cgroups[syn] = CgroupCounters(sent=9)
    return SavedState(ledger, retired, 1_700_000_000.0)


@pytest.fixture(autouse=True)
def same_boot(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cp, "boot_id", lambda: "boot-1")


def test_saved_totals_come_back(tmp_path: Path) -> None:
    c = Checkpoint(str(tmp_path / "state"), "abc")
    assert c.save(state(), GEN_MAPS)
    got = c.load(GEN_MAPS, max_identities=10)
    assert got is not None
    assert got.counters_since == 1_700_000_000.0
    assert got.ledger.totals.cgroups[7].sent == 5
    assert got.ledger.totals.flows == {(7, ("shop", "db", "pod")): (5, 0)}
    assert got.ledger.committed_through == 41
    assert list(got.retired.ids.values()) == [-1]
    assert got.retired.data.cgroups[-1].sent == 9
    assert got.retired._id_for(Identity("x", "y", "", "", "", None)) == -2, "new ids never reuse old ones"
    assert (tmp_path / "state").stat().st_mode & 0o777 == 0o700


def rewrite(c: Checkpoint, change: Any) -> None:
    data = c.path.read_bytes()
    d = marshal.loads(data[len(cp.MAGIC) :])
    change(d)
    c.path.write_bytes(cp.MAGIC + marshal.dumps(d))


@pytest.mark.parametrize(
    ("change", "why"),
    [
        (lambda d: d.update(generation_maps=(101, 102)), "other pinned maps"),
        (lambda d: d.update(boot_id="boot-0"), "rebooted"),
        (lambda d: d.update(format=0), "another podnet version"),
        (lambda d: d["ledger"].pop("peers"), "malformed"),
        (lambda d: d["ledger"]["totals"]["cgroups"].update({7: (1, 2)}), "malformed"),
        (lambda d: d["retired"]["ids"].update({("a", "b", "c", "d", "e", None): 5}), "malformed"),
        (lambda d: d.update(counters_since="x"), "malformed"),
    ],
)
def test_totals_of_other_pins_or_versions_are_not_used(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, change: Any, why: str
) -> None:
    c = Checkpoint(str(tmp_path), "abc")
    c.save(state(), GEN_MAPS)
    rewrite(c, change)
    with caplog.at_level(logging.WARNING):
        assert c.load(GEN_MAPS, max_identities=10) is None
    assert why in caplog.text and "counting starts from zero" in caplog.text


@pytest.mark.parametrize(
    "garbage", [b"", b"podnet-totals\n", b"podnet-totals\n\xff\x00", b"{}", b"\x00" * 64]
)
def test_garbage_is_not_used(tmp_path: Path, caplog: pytest.LogCaptureFixture, garbage: bytes) -> None:
    c = Checkpoint(str(tmp_path), "abc")
    c.path.write_bytes(garbage)
    assert c.load(GEN_MAPS, 10) is None
    assert "counting starts from zero" in caplog.text


def test_unreadable_or_missing_file(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    c = Checkpoint(str(tmp_path), "abc")
    assert c.load(GEN_MAPS, 10) is None
    c.path.mkdir()
    assert c.load(GEN_MAPS, 10) is None
    assert "unreadable" in caplog.text


def test_a_failed_save_is_counted_logged_once_and_leaves_the_old_file(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    c = Checkpoint(str(tmp_path), "abc")
    assert c.save(state(), GEN_MAPS)
    before = c.path.read_bytes()
    blocker = tmp_path / "blocked"
    blocker.write_text("a file where the directory should be")
    bad = Checkpoint(str(blocker), "abc")
    assert not bad.save(state(), GEN_MAPS)
    assert not bad.save(state(), GEN_MAPS)
    assert bad.failures == 2
    assert caplog.text.count("cannot save totals") == 1
    assert c.path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".totals-")] == []


def test_one_exporter_per_state(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    first = StateLock(str(tmp_path / "state"))
    first.acquire(timeout=0)
    second = StateLock(str(tmp_path / "state"))
    with pytest.raises(
        StateLockError, match=rf"another podnet-exporter \(pid {os.getpid()}\) uses .*--state-dir"
    ):
        second.acquire(timeout=0.2, poll=0.05)
    assert "waiting for the exporter holding" in caplog.text
    first.release()
    second.acquire(timeout=0)
    second.release()
