"""In-process stacks: the backend on a temporary directory, no kernel, no root needed."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fltfuse import (
    CallbackData,
    CloseParameters,
    CreateDisposition,
    CreateParameters,
    DirectoryControlParameters,
    DirectoryEntry,
    FileObject,
    FileType,
    Parameters,
    Requestor,
)
from fltfuse._backend import ROOT_INODE, PassthroughBackend
from fltfuse._stack import InstanceStack


class Driver:
    """Sends requests into an InstanceStack the way the kernel adapter does."""

    def __init__(self, root: Path):
        self.root = root
        self.backend = PassthroughBackend(str(root))
        self.stack = InstanceStack(self.backend)
        self.me = Requestor(os.getpid(), os.geteuid(), os.getegid(), 0o022)
        self.sent: list[CallbackData] = []

    async def send(
        self, params: Parameters, inode: int = ROOT_INODE, handle: int | None = None, **kw: Any
    ) -> CallbackData:
        cbd = CallbackData(FileObject(inode, handle), params, kw.get("requestor", self.me))
        self.sent.append(cbd)
        await self.stack.dispatch(cbd)
        return cbd

    async def opendir(self, inode: int = ROOT_INODE) -> int:
        p = CreateParameters(CreateDisposition.OPEN, FileType.DIRECTORY, os.O_RDONLY, handle_requested=True)
        await self.send(p, inode)
        assert p.handle is not None
        return p.handle

    async def list_from(self, handle: int, offset: int, inode: int = ROOT_INODE) -> list[DirectoryEntry]:
        """One DIRECTORY_CONTROL request: the entries served from ``offset``."""
        p = DirectoryControlParameters(offset)
        await self.send(p, inode, handle)
        return p.entries

    def take(self, handle: int, entries: list[DirectoryEntry]) -> None:
        """What the kernel adapter does for the entries the kernel took from a listing."""
        self.backend.commit_listing(handle, [e.attributes.ino for e in entries if e.name not in (b".", b"..")])

    async def closedir(self, handle: int, inode: int = ROOT_INODE) -> None:
        await self.send(CloseParameters(directory=True), inode, handle)


@pytest.fixture
def driver(tmp_path: Path) -> Iterator[Driver]:
    d = Driver(tmp_path)
    yield d
    d.backend.close()
