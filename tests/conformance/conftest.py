"""Fixtures of the conformance tier: the stacks it runs on, a known umask, and the backing directory of a mount path.

Every conformance test runs three times: on a volume with the empty stack, on
one with a transparent stack (three passthrough instances, one of them
attached by hand, and nullfilter), and on one with the context samples (ctx,
delete, change) and minispy's three instances, which must all behave exactly
as ext4 too.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from fltfuse.testing import MountedVolume

from ..conftest import session_volume

_STACKS = {
    "empty": ((), ()),
    "transparent": (
        ("passthrough", "nullfilter"),
        (("passthrough", "PassThrough 2", "370031"), ("passthrough", "PassThrough 0", "370029")),
    ),
    # filters that keep contexts and query names on every request, and must still be transparent:
    # the context samples, and minispy's three instances logging every request around them
    "contexts": (
        ("ctx", "delete", "change", "minispy"),
        (("minispy", "Minispy - Middle Instance", "370000"), ("minispy", "Minispy - Bottom Instance", "361000")),
    ),
}


@pytest.fixture(scope="session", params=sorted(_STACKS))
def volume(request: pytest.FixtureRequest) -> Iterator[MountedVolume]:
    """One mount per stack for the whole tier (this replaces the shared ``volume`` here)."""
    with session_volume("fltfuse-conformance-", *_STACKS[request.param]) as vol:
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
