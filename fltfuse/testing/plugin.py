"""pytest fixtures for filter authors, loaded automatically when fltfuse is installed.

* ``fltfuse_in_process``: a factory ``fltfuse_in_process(filters=[...], filter_path=[...], parameters={...})``
  returning an :class:`~fltfuse.testing.InProcessVolume` over a fresh temporary
  directory; every volume it made is closed after the test. No root needed.
* ``fltfuse_mount``: a factory ``fltfuse_mount(filters=[...], filter_path=[...], parameters={...})``
  returning a :class:`~fltfuse.testing.MountedVolume`: a fresh ext4 image
  mounted through a real daemon, unmounted after the test. Skips, saying why,
  on machines without root, /dev/fuse or loop devices.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from typing import Any

import pytest

from .in_process import InProcessVolume
from .mounted import MountedVolume, mounted_volume, why_no_mount


@pytest.fixture
def fltfuse_in_process(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., InProcessVolume]]:
    """Make in-process volumes (filters, filter_path, verifier) over fresh directories; closed after the test."""
    made: list[InProcessVolume] = []

    def make(
        filters: Any = (), filter_path: Any = (), verifier: bool = True, parameters: Any = None
    ) -> InProcessVolume:
        directory = tmp_path_factory.mktemp("fltfuse-volume")
        volume = InProcessVolume(directory, filters, filter_path=filter_path, verifier=verifier, parameters=parameters)
        made.append(volume)
        return volume

    yield make
    for volume in made:
        volume.close()


@pytest.fixture
def fltfuse_mount(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., MountedVolume]]:
    """Mount fresh ext4 volumes through real daemons (filters, filter_path, size); unmounted after the test."""
    reason = why_no_mount()
    if reason:
        pytest.skip(reason)
    with ExitStack() as stack:

        def make(filters: Any = (), filter_path: Any = (), size: str = "1G", parameters: Any = None) -> MountedVolume:
            directory = tmp_path_factory.mktemp("fltfuse-mount")
            paths = tuple(os.fspath(p) for p in filter_path)
            return stack.enter_context(
                mounted_volume(directory, size=size, filters=tuple(filters), filter_path=paths, parameters=parameters)
            )

        yield make
