"""Fixtures of the conformance tier: the stacks it runs on, a known umask, and the backing directory of a mount path.

Every conformance test runs twice: on a volume with the empty stack, and on one
with a transparent stack (three passthrough instances, one of them attached
by hand, and nullfilter), which must behave exactly as ext4 too.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from fltfuse.testing import MountedVolume, mounted_volume, why_no_mount

_STACKS = {
    "empty": ((), ()),
    "transparent": (
        ("passthrough", "nullfilter"),
        (("passthrough", "PassThrough 2", "370031"), ("passthrough", "PassThrough 0", "370029")),
    ),
}


@pytest.fixture(scope="session", params=sorted(_STACKS))
def volume(request: pytest.FixtureRequest) -> Iterator[MountedVolume]:
    """One mount per stack for the whole tier (this replaces the shared ``volume`` here)."""
    reason = why_no_mount()
    if reason:
        pytest.skip(reason)
    filters, attached = _STACKS[request.param]
    with tempfile.TemporaryDirectory(prefix="fltfuse-conformance-", dir="/var/tmp") as tmp:
        with mounted_volume(tmp, size="8G", inodes=400_000, filters=filters) as vol:
            for name, instance, altitude in attached:
                subprocess.run(
                    [
                        sys.executable,
                        "-m",
                        "fltfuse.fltmc",
                        "attach",
                        name,
                        vol.mountpoint,
                        "-i",
                        instance,
                        "-a",
                        altitude,
                    ],
                    check=True,
                    capture_output=True,
                    timeout=60,
                )
            listed = subprocess.run(
                [sys.executable, "-m", "fltfuse.fltmc", "instances", vol.mountpoint],
                check=True,
                capture_output=True,
                text=True,
                timeout=60,
            ).stdout.splitlines()[2:]
            assert len(listed) == len(filters) + len(attached), listed
            yield vol


@pytest.fixture(autouse=True)
def fixed_umask() -> Iterator[int]:
    """Every conformance test starts with umask 022 and leaves the process's umask as it found it."""
    old = os.umask(0o022)
    try:
        yield 0o022
    finally:
        os.umask(old)


@pytest.fixture
def backing_of(volume: MountedVolume) -> Callable[[Path], Path]:
    """``backing_of(path_on_mount)``: the same object's path on the raw ext4 behind the mount."""

    def convert(path: Path) -> Path:
        return Path(volume.backing) / path.relative_to(volume.mountpoint)

    return convert
