"""InProcessVolume: a filter stack over a real directory, with no kernel in between.

Requests are made by the daemon's own kernel adapter, exactly as for a FUSE
request (the same callback data, the same parameters), so a filter sees in a
test what it will see on a mount. Paths are resolved one LOOKUP per component,
files are read and written through CREATE, READ, WRITE, CLEANUP and CLOSE.
Failures raise ``OSError`` with the errno a caller of the mount would get.

Use it as an async context manager (under trio)::

    async with InProcessVolume(tmp_path, filters=["passthrough"]) as vol:
        await vol.write_file("a.txt", b"data")
        assert await vol.read_file("a.txt") == b"data"
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from types import TracebackType
from typing import Any

import pyfuse3

from .. import _loader
from .._backend import ROOT_INODE, PassthroughBackend
from .._callback_data import (
    CallbackData,
    DirectoryControlParameters,
    FileInformationClass,
    FileObject,
    Requestor,
    SetAttributesParameters,
)
from .._kernel import KernelAdapter
from .._port.wire import port_name
from .._registration import InstanceSetupFlags, InstanceTeardownFlags
from .._stack import Filter, Instance, InstanceStack, VerifierError
from .._status import errno_from_status
from .._volume import VolumeProperties


@dataclass(frozen=True)
class _Caller:
    """What pyfuse3's RequestContext carries: the calling process."""

    pid: int
    uid: int
    gid: int
    umask: int


class InProcessVolume:
    """A volume of ``directory`` with ``filters`` attached, driven in-process.

    ``filters`` are filter names (found like ``fltfuse mount --filter``, also in
    ``filter_path``), :class:`~fltfuse.Instance` objects, or ``(Filter,
    altitude)`` pairs. ``parameters`` overrides named filters' INF parameters
    (``{"name": {"KEY": "VALUE"}}``, as ``--param name.KEY=VALUE``). ``verifier`` (on by default) makes a filter's rule
    violation raise :class:`~fltfuse.VerifierError` in the test, and a context leaked at teardown fail it at close.
    The volume's name (its ``mount_point``, the prefix of file names) is ``directory``.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        filters: Sequence[str | Instance | tuple[Filter, str | Decimal]] = (),
        *,
        filter_path: Sequence[str | os.PathLike[str]] = (),
        verifier: bool = True,
        parameters: Mapping[str, Mapping[str, str]] | None = None,
    ):
        self.directory = Path(directory)
        self._backend = PassthroughBackend(str(directory))
        volume = VolumeProperties("directory", None, str(self.directory.absolute()), str(directory))
        self.stack = InstanceStack(self._backend, verifier=verifier, volume=volume)
        overrides = {name.lower(): dict(values) for name, values in (parameters or {}).items()}
        self.port_directory = tempfile.mkdtemp(prefix="fltfuse-ports-")
        os.chmod(self.port_directory, 0o755)  # as a daemon's: each port's own mode decides who reaches it
        self.filters: list[Filter] = []  # every filter started here, attached or not
        try:
            for spec in filters:
                for instance in self._instances(spec, filter_path, overrides):
                    self.stack.attach(instance, InstanceSetupFlags.AUTOMATIC_ATTACHMENT)
        except BaseException:
            self.stack.dismount()  # the instances attached so far, then the descriptors
            self._unload_filters()
            self._backend.close()
            raise
        self._adapter = KernelAdapter(self.stack, self._backend)
        self._caller = _Caller(os.getpid(), os.geteuid(), os.getegid(), 0o022)
        self._lookups: Counter[int] = Counter()

    def _instances(
        self,
        spec: str | Instance | tuple[Filter, str | Decimal],
        filter_path: Sequence[str | os.PathLike[str]],
        parameters: Mapping[str, Mapping[str, str]],
    ) -> list[Instance]:
        """The instances ``spec`` attaches; every filter it names is started (its ports open) first."""
        if isinstance(spec, Instance):
            instances = [spec]
        elif isinstance(spec, tuple):
            filter_, altitude = spec
            instances = [Instance(filter_, f"{filter_.name} Instance", Decimal(altitude))]
        else:
            instances = []
            for loaded in _loader.load_all([spec], filter_path, parameters):
                self._start(loaded.filter)
                default = _loader.default_instance(loaded.filter, loaded.inf)
                instances += [default] if default is not None else []
        for instance in instances:
            self._start(instance.filter)
        return instances

    def _start(self, filter_: Filter) -> None:
        if filter_ not in self.filters:
            if filter_.port_directory is None:
                filter_.port_directory = self.port_directory
            self.filters.append(filter_)
            filter_.start()

    def _unload_filters(self) -> None:
        """Unload (mandatory) every filter started here: their ports close and clients disconnect."""
        for filter_ in self.filters:
            filter_.unload_mandatory()
        shutil.rmtree(self.port_directory, ignore_errors=True)

    def port_path(self, name: str) -> str:
        """The socket of the communication port ``name`` a filter of this volume created (for fltfuse.port)."""
        return os.path.join(self.port_directory, port_name(name))

    async def __aenter__(self) -> InProcessVolume:
        return self

    async def __aexit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Unmount while requests may be in flight: detach every instance as a daemon does on SIGTERM
        (teardown with VOLUME_DISMOUNT, draining what each holds), then close."""
        await self.stack.detach_all(InstanceTeardownFlags.VOLUME_DISMOUNT)
        self.close()

    def close(self) -> None:
        """Unmount with nothing in flight: forget what was looked up, tear the instances down, release descriptors.

        In verifier mode a context an instance leaked (still referenced after its teardown) then fails the test.
        """
        self._backend_forget()
        self.stack.dismount()
        self._unload_filters()
        self._backend.close()
        if self.stack.verifier and self.stack.contexts.leaks:
            raise VerifierError("contexts leaked at teardown: " + "; ".join(self.stack.contexts.leaks))

    def _backend_forget(self) -> None:
        for ino, count in self._lookups.items():
            self._backend.forget(ino, count)
        self._lookups.clear()

    # -- the calls a test makes -------------------------------------------------------------

    async def _call(self, path: str, method: str, *args: Any) -> Any:
        try:
            return await getattr(self._adapter, method)(*args)
        except pyfuse3.FUSEError as exc:
            raise OSError(exc.errno, os.strerror(exc.errno), path) from None

    async def lookup(self, path: str) -> int:
        """The inode of ``path`` (relative to the volume root), one LOOKUP per component."""
        ino = ROOT_INODE
        for part in Path(path).parts:
            if part == "/":
                continue
            entry = await self._call(path, "lookup", ino, os.fsencode(part), self._caller)
            ino = entry.st_ino
            self._lookups[ino] += 1
        return ino

    async def forget(self, target: str | int) -> None:
        """The kernel forgets an inode, as after ``drop_caches``: FORGET with every lookup this volume took of it.

        ``target`` is a path, or an inode whose names are gone. Its file and
        stream contexts are cleaned up and its cached names dropped, as on a mount.
        """
        ino = await self.lookup(target) if isinstance(target, str) else target
        await self._adapter.forget([(ino, self._lookups.pop(ino))])

    async def _parent(self, path: str) -> tuple[int, bytes]:
        p = Path(path)
        return await self.lookup(str(p.parent)), os.fsencode(p.name)

    async def stat(self, path: str) -> pyfuse3.EntryAttributes:
        entry: pyfuse3.EntryAttributes = await self._call(path, "getattr", await self.lookup(path), self._caller)
        return entry

    async def open(self, path: str, flags: int = os.O_RDONLY, mode: int = 0o644) -> int:
        """A file handle; with O_CREAT the file is created if it does not exist."""
        try:
            ino = await self.lookup(path)
        except FileNotFoundError:
            if not flags & os.O_CREAT:
                raise
            parent, name = await self._parent(path)
            info, entry = await self._call(path, "create", parent, name, mode, flags, self._caller)
            self._lookups[entry.st_ino] += 1
            return int(info.fh)
        if flags & os.O_CREAT and flags & os.O_EXCL:
            raise FileExistsError(17, os.strerror(17), path)
        info = await self._call(path, "open", ino, flags & ~(os.O_CREAT | os.O_EXCL), self._caller)
        return int(info.fh)

    async def read(self, handle: int, offset: int, length: int) -> bytes:
        return bytes(await self._call("", "read", handle, offset, length))

    async def write(self, handle: int, offset: int, data: bytes) -> int:
        return int(await self._call("", "write", handle, offset, data))

    async def close_handle(self, handle: int) -> None:
        """close(2): CLEANUP, then CLOSE."""
        await self._call("", "flush", handle)
        await self._call("", "release", handle)

    async def read_file(self, path: str) -> bytes:
        handle = await self.open(path, os.O_RDONLY)
        try:
            chunks = []
            offset = 0
            while chunk := await self.read(handle, offset, 128 * 1024):
                chunks.append(chunk)
                offset += len(chunk)
            return b"".join(chunks)
        finally:
            await self.close_handle(handle)

    async def write_file(self, path: str, data: bytes, mode: int = 0o644) -> None:
        handle = await self.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        try:
            offset = 0
            while offset < len(data):
                offset += await self.write(handle, offset, data[offset : offset + 128 * 1024])
        finally:
            await self.close_handle(handle)

    async def truncate(self, path: str, size: int) -> int:
        """truncate(2) of ``path`` (SET_INFORMATION, END_OF_FILE, with no handle); returns the size stat shows."""
        p = SetAttributesParameters(FileInformationClass.END_OF_FILE, size=size)
        cbd = CallbackData(FileObject(await self.lookup(path)), p, Requestor(*self._caller_ids()))
        await self.stack.dispatch(cbd)
        if cbd.io_status.status >= 0x80000000:
            code = errno_from_status(cbd.io_status.status) or 5
            raise OSError(code, os.strerror(code), path)
        assert p.attributes is not None
        return p.attributes.size

    async def mkdir(self, path: str, mode: int = 0o755) -> None:
        parent, name = await self._parent(path)
        entry = await self._call(path, "mkdir", parent, name, mode, self._caller)
        self._lookups[entry.st_ino] += 1

    async def unlink(self, path: str) -> None:
        parent, name = await self._parent(path)
        await self._call(path, "unlink", parent, name, self._caller)

    async def rmdir(self, path: str) -> None:
        parent, name = await self._parent(path)
        await self._call(path, "rmdir", parent, name, self._caller)

    async def rename(self, old: str, new: str, flags: int = 0) -> None:
        old_parent, old_name = await self._parent(old)
        new_parent, new_name = await self._parent(new)
        await self._call(old, "rename", old_parent, old_name, new_parent, new_name, flags, self._caller)

    async def listdir(self, path: str = ".") -> list[str]:
        """The names in a directory (without . and ..), in the backend's order."""
        ino = await self.lookup(path)
        handle = await self._call(path, "opendir", ino, self._caller)
        names: list[str] = []
        try:
            offset = 0
            while True:
                p = DirectoryControlParameters(offset)
                cbd = CallbackData(FileObject(ino, handle), p, Requestor(*self._caller_ids()))
                await self.stack.dispatch(cbd)
                if cbd.io_status.status >= 0x80000000:
                    raise OSError(5, "listing failed", path)
                if not p.entries:
                    return names
                taken = [e for e in p.entries if e.name not in (b".", b"..")]
                names.extend(os.fsdecode(e.name) for e in taken)
                self._backend.commit_listing(handle, [e.attributes.ino for e in taken])
                for e in taken:
                    self._lookups[e.attributes.ino] += 1
                offset = p.entries[-1].next_offset
        finally:
            await self._call(path, "releasedir", handle)

    def _caller_ids(self) -> tuple[int, int, int, int]:
        c = self._caller
        return c.pid, c.uid, c.gid, c.umask
