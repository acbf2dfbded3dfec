"""The lock files agree with pyproject.toml: every direct dependency is pinned, within its range, with hashes.

requirements.lock (runtime: make setup, the image) and requirements-test.lock (runtime + test extra:
make setup-test, CI) are written by `make lock`; these tests fail when pyproject changes without it.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parents[2]
RUNTIME_LOCK = REPO / "requirements.lock"
TEST_LOCK = REPO / "requirements-test.lock"
LOCKS = [RUNTIME_LOCK, TEST_LOCK]
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)((?:\s+--hash=sha256:[0-9a-f]{64})*)\s*$")


def lock_lines(path: Path) -> list[str]:
    """Logical lines of a requirements file: continuations joined, comments and blank lines dropped."""
    out: list[str] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.split(" #", 1)[0].rstrip() if not raw.lstrip().startswith("#") else ""
        if line.endswith("\\"):
            pending += line[:-1].strip() + " "
            continue
        line = (pending + line.strip()).strip()
        pending = ""
        if line:
            out.append(line)
    assert not pending, f"{path.name} ends inside a continued line"
    return out


def pins(path: Path) -> dict[str, Version]:
    result: dict[str, Version] = {}
    for line in lock_lines(path):
        m = PIN.match(line)
        assert m, f"{path.name}: not an exact pin with sha256 hashes: {line[:100]}"
        name = canonicalize_name(m.group(1))
        assert name not in result, f"{path.name}: {name} pinned twice"
        result[name] = Version(m.group(2))
    return result


def project() -> dict[str, list[str]]:
    data = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return {"runtime": data["dependencies"], "test": data["optional-dependencies"]["test"]}


@pytest.mark.parametrize("lock", LOCKS, ids=lambda p: p.name)
def test_every_pin_is_exact_and_hashed(lock: Path) -> None:
    lines = lock_lines(lock)
    assert lines, f"{lock.name} pins nothing"
    for line in lines:
        m = PIN.match(line)
        assert m, f"{lock.name}: not an exact pin: {line[:100]}"
        assert "--hash=sha256:" in m.group(3), f"{lock.name}: {m.group(1)} has no hash"


@pytest.mark.parametrize("lock", LOCKS, ids=lambda p: p.name)
def test_lock_has_no_bcc_and_no_local_sources(lock: Path) -> None:
    # BCC comes from Debian's python3-bpfcc; PyPI's "bcc" is an unrelated package.
    assert "bcc" not in pins(lock)
    text = lock.read_text()
    for needle in ("file:", "--find-links", "--index-url", "--extra-index-url", "-e ", "/opt/"):
        assert needle not in text, f"{lock.name} refers to a local or non-default source ({needle!r})"


@pytest.mark.parametrize(
    ("lock", "groups"),
    [(RUNTIME_LOCK, ["runtime"]), (TEST_LOCK, ["runtime", "test"])],
    ids=["requirements.lock", "requirements-test.lock"],
)
def test_direct_dependencies_are_pinned_within_pyproject_ranges(lock: Path, groups: list[str]) -> None:
    pinned = pins(lock)
    deps = project()
    for group in groups:
        for spec in deps[group]:
            req = Requirement(spec)
            if req.marker is not None and not req.marker.evaluate({"extra": "test"}):
                continue
            name = canonicalize_name(req.name)
            assert name in pinned, f"{lock.name}: {req.name} ({group}) is not pinned; run `make lock`"
            assert req.specifier.contains(pinned[name], prereleases=True), (
                f"{lock.name}: {req.name}=={pinned[name]} is outside pyproject's {req}; run `make lock`"
            )
            assert req.specifier, f"pyproject: {req.name} has no floor"


def test_runtime_lock_agrees_with_test_lock() -> None:
    runtime, test = pins(RUNTIME_LOCK), pins(TEST_LOCK)
    assert runtime.keys() <= test.keys()
    assert {n: v for n, v in runtime.items() if test[n] != v} == {}, "the two locks pin different versions"


def test_setup_and_image_install_from_the_locks() -> None:
    setup = (REPO / "scripts" / "setup.sh").read_text()
    assert "--require-hashes" in setup
    assert "requirements.lock" in setup and "requirements-test.lock" in setup
    docker = (REPO / "Dockerfile").read_text()
    assert re.search(r"pip install --require-hashes -r \S*requirements\.lock", docker)
    assert re.search(r"pip install --no-deps ", docker)
