"""Fixtures of the conformance tier: a known umask, and the backing directory of a mount path."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from fltfuse.testing import MountedVolume


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
