"""Fixtures of the conformance tier: the stacks it runs on, a known umask, and the backing directory of a mount path.

Every conformance test runs four times: on a volume with the empty stack, on
one with a transparent stack (three passthrough instances, one of them
attached by hand, nullfilter, and swapbuffers, which swaps its own buffers
into every read, write and listing), on one with the context samples (ctx,
delete, change) and minispy's three instances, which must all behave exactly
as ext4 too, and on one with the encryption filter, which must too except
where it differs by design: a regular file's st_blocks (the ciphertext takes
more room), and the size of its backing file (the ciphertext's).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from filters.encryption.layout import plain_size
from fltfuse.testing import MountedVolume

from ..conftest import session_volume
from . import differential

_STACKS = {
    "empty": ((), ()),
    "transparent": (
        ("passthrough", "nullfilter", "swapbuffers"),
        (("passthrough", "PassThrough 2", "370031"), ("passthrough", "PassThrough 0", "370029")),
    ),
    # filters that keep contexts and query names on every request, and must still be transparent:
    # the context samples, and minispy's three instances logging every request around them
    "contexts": (
        ("ctx", "delete", "change", "minispy"),
        (("minispy", "Minispy - Middle Instance", "370000"), ("minispy", "Minispy - Bottom Instance", "361000")),
    ),
    # the encryption filter: contents stored as ciphertext, everything else as ext4 has it
    "encryption": (("encryption",), ()),
}
_PARAMETERS: dict[str, Callable[[str], dict[str, dict[str, str]]]] = {
    "encryption": lambda tmp: {"encryption": {"KeyDirectory": os.path.join(tmp, "keys")}},
}
_TRAITS = {"encryption": differential.StackTraits(blocks_differ=True, shown_size=plain_size, stores_plaintext=False)}


@pytest.fixture(scope="session", params=sorted(_STACKS))
def volume(request: pytest.FixtureRequest) -> Iterator[MountedVolume]:
    """One mount per stack for the whole tier (this replaces the shared ``volume`` here)."""
    with session_volume("fltfuse-conformance-", *_STACKS[request.param], _PARAMETERS.get(request.param)) as vol:
        yield vol


@pytest.fixture(autouse=True)
def stack_traits(request: pytest.FixtureRequest) -> Iterator[differential.StackTraits]:
    """The differences by design of the stack the test runs on (see :class:`differential.StackTraits`)."""
    callspec = getattr(request.node, "callspec", None)
    stack = callspec.params.get("volume") if callspec else None
    differential.traits = _TRAITS.get(stack, differential.TRANSPARENT)
    try:
        yield differential.traits
    finally:
        differential.traits = differential.TRANSPARENT


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
