"""Fixtures shared by the three tiers.

* ``volume``: one real fltfuse mount over a loop-backed ext4 image for the
  whole session (mounted tiers). Each test that uses it is checked afterwards
  for error lines in the daemon's log (a daemon that logs an error it did not
  expect fails the test, as in libfuse's own tests).
* ``pair``: a fresh directory through the mount and a fresh directory on the
  raw backing ext4, for differential tests.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from fltfuse.testing import MountedVolume, mounted_volume, why_no_mount

_counter = itertools.count()


@contextlib.contextmanager
def session_volume(
    prefix: str,
    filters: tuple[str, ...] = (),
    attached: tuple[tuple[str, str, str], ...] = (),
    parameters: Callable[[str], dict[str, dict[str, str]]] | None = None,
) -> Iterator[MountedVolume]:
    """A big volume for a whole session, with ``filters`` loaded and ``attached`` (filter, instance,
    altitude) attached by fltmc; the stack is checked with ``fltmc instances``. ``parameters(tmp)``
    gives the filters' parameters, given the session's temporary directory. Skips without mounts."""
    reason = why_no_mount()
    if reason:
        pytest.skip(reason)
    with tempfile.TemporaryDirectory(prefix=prefix, dir="/var/tmp") as tmp:
        given = parameters(tmp) if parameters else None
        with mounted_volume(tmp, size="8G", inodes=400_000, filters=filters, parameters=given) as vol:
            for name, instance, altitude in attached:
                _fltmc("attach", name, vol.mountpoint, "-i", instance, "-a", altitude)
            listed = _fltmc("instances", vol.mountpoint).splitlines()[2:]
            assert len(listed) == len(filters) + len(attached), listed
            yield vol


def _fltmc(*args: str) -> str:
    argv = [sys.executable, "-m", "fltfuse.fltmc", *args]
    return subprocess.run(argv, check=True, capture_output=True, text=True, timeout=60).stdout


@pytest.fixture(scope="session")
def volume() -> Iterator[MountedVolume]:
    with session_volume("fltfuse-test-") as vol:
        yield vol


@pytest.fixture
def clean_log(volume: MountedVolume, request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail the test if the daemon logged an ERROR or a traceback while it ran."""
    start = len(volume.log_text())
    yield
    if request.node.get_closest_marker("expect_daemon_errors") is None:
        volume.assert_no_errors_logged(start)


@dataclass
class Pair:
    """The same fresh directory name on both sides: ``mnt`` through fltfuse, ``raw`` on ext4."""

    mnt: Path
    raw: Path


@pytest.fixture
def pair(volume: MountedVolume, clean_log: None, request: pytest.FixtureRequest) -> Pair:
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", request.node.name)[:80] + f"-{next(_counter)}"
    mnt = Path(volume.mountpoint) / "t" / name
    raw = Path(volume.backing) / "raw" / name
    os.makedirs(mnt)
    os.makedirs(raw)
    return Pair(mnt, raw)


@pytest.fixture
def workdir(volume: MountedVolume, clean_log: None, request: pytest.FixtureRequest) -> Path:
    """A fresh directory on the mount."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", request.node.name)[:80] + f"-{next(_counter)}"
    path = Path(volume.mountpoint) / "w" / name
    os.makedirs(path)
    return path
