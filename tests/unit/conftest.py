"""In-process stacks: the backend on a temporary directory, no kernel, no root needed."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fltfuse import CallbackData, FileObject, Parameters, Requestor
from fltfuse._backend import ROOT_INODE, PassthroughBackend
from fltfuse._stack import InstanceStack


class Driver:
    """Sends requests into an InstanceStack the way the kernel adapter does."""

    def __init__(self, root: Path):
        self.root = root
        self.backend = PassthroughBackend(str(root))
        self.stack = InstanceStack(self.backend)
        self.me = Requestor(os.getpid(), os.geteuid(), os.getegid(), 0o022)

    async def send(
        self, params: Parameters, inode: int = ROOT_INODE, handle: int | None = None, **kw: Any
    ) -> CallbackData:
        cbd = CallbackData(FileObject(inode, handle), params, kw.get("requestor", self.me))
        await self.stack.dispatch(cbd)
        return cbd


@pytest.fixture
def driver(tmp_path: Path) -> Iterator[Driver]:
    d = Driver(tmp_path)
    yield d
    d.backend.close()
