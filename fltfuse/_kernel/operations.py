"""The kernel adapter: each FUSE request becomes one CallbackData, and io_status becomes the reply.

Where it sits: stage (1) of the data flow, the only code that imports pyfuse3 or
raises ``FUSEError``. Each method builds the parameters for its request (the
table below), awaits the instance stack, and answers the kernel from the
parameters' output fields; a failure status becomes an errno through the one
table in ``fltfuse._status``.

=================  ===========================  ===========================================
FUSE request       major function (minor)       parameters
=================  ===========================  ===========================================
lookup             LOOKUP                       LookupParameters
forget             FORGET (not dispatched)      the backend drops its pin at zero lookups
getattr            QUERY_INFORMATION (ALL)      QueryInformationParameters
setattr            SET_INFORMATION (BASIC or    SetAttributesParameters
                   END_OF_FILE)
readlink           FILE_SYSTEM_CONTROL          FileSystemControlParameters
                   (GET_REPARSE_POINT)
mknod, mkdir,      CREATE (disposition CREATE)  CreateParameters (file_type from the mode)
symlink
open, opendir      CREATE (OPEN; OVERWRITE      CreateParameters (handle_requested)
                   with O_TRUNC)
create             CREATE (CREATE / OPEN_IF /   CreateParameters (handle_requested)
                   OVERWRITE_IF)
unlink, rmdir      SET_INFORMATION              DispositionParameters
                   (DISPOSITION)
rename             SET_INFORMATION (RENAME_EX)  RenameParameters
link               SET_INFORMATION (LINK)       LinkParameters
read               READ                         ReadParameters
write              WRITE                        WriteParameters
flush              CLEANUP                      CleanupParameters (never fails)
release,           CLOSE                        CloseParameters (never fails)
releasedir
fsync, fsyncdir    FLUSH_BUFFERS                FlushBuffersParameters
readdir(plus)      DIRECTORY_CONTROL            DirectoryControlParameters
                   (QUERY_DIRECTORY)
statfs             QUERY_VOLUME_INFORMATION     QueryVolumeInformationParameters
getxattr,          QUERY_EA (GET / LIST)        QueryEaParameters
listxattr
setxattr,          SET_EA (SET / REMOVE)        SetEaParameters
removexattr
access             ACCESS                       AccessParameters
=================  ===========================  ===========================================

The exception boundary: pyfuse3 ends its main loop on any exception other than
``FUSEError``, so every request method runs inside :func:`_boundary`, which
logs any other exception with the request and its arguments and answers EIO.
CLEANUP and CLOSE cannot fail: their errors are logged and the caller succeeds.
"""

from __future__ import annotations

import collections
import errno
import functools
import logging
import os
import stat
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import pyfuse3
import trio

from .._backend.passthrough import PassthroughBackend
from .._callback_data import (
    AccessParameters,
    CallbackData,
    CleanupParameters,
    CloseParameters,
    CreateDisposition,
    CreateParameters,
    DirectoryControlParameters,
    DispositionParameters,
    EaMinor,
    FileAttributes,
    FileInformationClass,
    FileObject,
    FileSystemControlParameters,
    FileType,
    FlushBuffersParameters,
    LinkParameters,
    LookupParameters,
    MajorFunction,
    Parameters,
    QueryEaParameters,
    QueryInformationParameters,
    QueryVolumeInformationParameters,
    ReadParameters,
    RenameParameters,
    Requestor,
    SetAttributesParameters,
    SetEaParameters,
    WriteParameters,
)
from .._port.deadlocks import requesting_thread
from .._stack import InstanceStack
from .._status import errno_from_status

log = logging.getLogger("fltfuse.kernel")

_F = TypeVar("_F", bound=Callable[..., Awaitable[Any]])


def _boundary(method: _F) -> _F:
    """Answer EIO, and log, for any exception but FUSEError escaping a request."""
    name = method.__name__

    @functools.wraps(method)
    async def guarded(self: KernelAdapter, *args: Any) -> Any:
        try:
            return await method(self, *args)
        except pyfuse3.FUSEError:
            raise
        except Exception:
            log.exception("internal error in FUSE %s%r; answered EIO", name, _loggable(args))
            raise pyfuse3.FUSEError(errno.EIO) from None

    return guarded  # type: ignore[return-value]


def _loggable(args: tuple[Any, ...]) -> tuple[Any, ...]:
    out = []
    for a in args:
        if isinstance(a, (bytes, bytearray, memoryview)) and len(a) > 64:
            a = f"<{len(a)} bytes>"
        elif type(a).__module__ == "pyfuse3":
            a = type(a).__name__
        out.append(a)
    return tuple(out)


def _requestor(ctx: pyfuse3.RequestContext) -> Requestor:
    return Requestor(ctx.pid, ctx.uid, ctx.gid, ctx.umask)


_KERNEL = Requestor(0, 0, 0, 0)  # for requests the kernel makes on its own (forget)


class KernelAdapter(pyfuse3.Operations):
    """pyfuse3 Operations that turn each request into a CallbackData for ``stack``.

    ``attr_timeout`` and ``entry_timeout`` are how long the kernel may cache
    attributes and names; the adapter uses 0 while an attached instance
    registered LOOKUP or QUERY_INFORMATION with ``BYPASS_KERNEL_CACHE``, so it
    sees every one.
    """

    supports_dot_lookup = True
    enable_acl = True
    enable_writeback_cache = False

    def __init__(
        self,
        stack: InstanceStack,
        backend: PassthroughBackend,
        *,
        attr_timeout: float = 60.0,
        entry_timeout: float = 60.0,
    ):
        super().__init__()
        self._stack = stack
        self._backend = backend
        self._attr_timeout_max = attr_timeout
        self._entry_timeout_max = entry_timeout
        self._files: dict[int, FileObject] = {}
        # pid -> (directory, name, inode) of its last LOOKUP: the link an open that follows used
        self._last_lookup: dict[int, tuple[int, bytes, int]] = {}
        # inode -> how many failed WRITEs' pages are still to be dropped (see write)
        self._unwritten_pages: collections.Counter[int] = collections.Counter()
        stack.invalidate_kernel_cache = self._generated_io_done
        self.refresh_cache_policy()

    def refresh_cache_policy(self) -> None:
        """Recompute what the kernel may cache from what the attached instances see."""
        bypass = self._stack.bypasses_kernel_cache
        self._attr_timeout = 0.0 if bypass(MajorFunction.QUERY_INFORMATION) else self._attr_timeout_max
        self._entry_timeout = 0.0 if bypass(MajorFunction.LOOKUP) else self._entry_timeout_max
        self._direct_io = bypass(MajorFunction.READ) or bypass(MajorFunction.WRITE)

    # -- plumbing -------------------------------------------------------------

    async def _call(self, target: FileObject, params: Parameters, requestor: Requestor) -> CallbackData:
        cbd = CallbackData(target, params, requestor)
        waiting = requesting_thread.set(requestor.pid)  # the caller's thread waits for the answer: see deadlocks
        try:
            if params.MAJOR is MajorFunction.CREATE:
                target.creating = True  # until the file system has made or opened the object
                await self._stack.dispatch(cbd)
                target.creating = False
            else:
                await self._stack.dispatch(cbd)
        finally:
            requesting_thread.reset(waiting)
        status = cbd.io_status.status
        if status:
            code = errno_from_status(status)
            if code:
                raise pyfuse3.FUSEError(code)
        return cbd

    def _entry(self, a: FileAttributes | None) -> pyfuse3.EntryAttributes:
        if a is None:
            raise ValueError("the request succeeded without attributes")
        e = pyfuse3.EntryAttributes()
        e.st_ino = a.ino
        e.generation = 0
        # a file with several hard links: the kernel asks again at each path walk, so an
        # open is known to come through the link the caller named (its opened name)
        e.entry_timeout = 0.0 if a.nlink > 1 and not stat.S_ISDIR(a.mode) else self._entry_timeout
        e.attr_timeout = self._attr_timeout
        e.st_mode = a.mode
        e.st_nlink = a.nlink
        e.st_uid = a.uid
        e.st_gid = a.gid
        e.st_rdev = a.rdev
        e.st_size = a.size
        e.st_blksize = a.blksize
        e.st_blocks = a.blocks
        e.st_atime_ns = a.atime_ns
        e.st_mtime_ns = a.mtime_ns
        e.st_ctime_ns = a.ctime_ns
        return e

    def _file(self, fh: int) -> FileObject:
        fo = self._files.get(fh)
        if fo is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        return fo

    def _opened(self, fo: FileObject, params: CreateParameters) -> int:
        fh = params.handle
        if fh is None:
            raise ValueError("CREATE succeeded without a handle")
        fo.handle = fh
        self._files[fh] = fo
        return fh

    def _file_info(self, fo: FileObject, params: CreateParameters) -> pyfuse3.FileInfo:
        """The reply to an open of a regular file.

        The kernel keeps a file's pages cached across opens and drops them when
        it sees the size or mtime change (auto_inval_data), so reads it serves
        from its cache reach neither the filters nor ext4 (see the backend's
        ``_access_time``). While an instance registered READ or WRITE with
        ``BYPASS_KERNEL_CACHE``, new handles are opened for direct I/O instead:
        every read(2) and write(2) is a request, sent as the caller made it.
        """
        fh = self._opened(fo, params)
        if self._direct_io:
            fo.uncached = True
            return pyfuse3.FileInfo(fh=fh, direct_io=True)
        # pages a failed WRITE left are being dropped: the kernel drops them itself before this open returns
        return pyfuse3.FileInfo(fh=fh, keep_cache=fo.inode not in self._unwritten_pages)

    def _link(self, inode: int, ctx: pyfuse3.RequestContext) -> tuple[int, bytes] | None:
        """The name the caller reached ``inode`` through, if its last LOOKUP was of it."""
        last = self._last_lookup.get(ctx.pid)
        if last is not None and last[2] == inode:
            return last[0], last[1]
        return None

    async def _generated_io_done(self, cbd: CallbackData) -> None:
        """Filter-initiated I/O changed a file or a name behind the kernel's back: drop what it caches.

        A file's pages are dropped before the generated request returns, unless the kernel is waiting
        for a READ or WRITE of that file: it holds those pages locked until the request is answered,
        and the filter's I/O may be part of answering it, so they are dropped as soon as it is.
        """
        p = cbd.iopb.parameters
        if isinstance(p, (WriteParameters, SetAttributesParameters)):
            inode = cbd.iopb.target_file_object.inode
            if self._stack.answering_io_of(inode):
                trio.lowlevel.spawn_system_task(self._invalidate_data, inode)
            else:
                await self._invalidate_data(inode)
            return
        changed_directories = []
        if isinstance(p, (RenameParameters, DispositionParameters)):
            removed = [(p.parent, p.name)]
            if isinstance(p, RenameParameters):
                removed.append((p.new_parent, p.new_name))  # a name it replaced
            for parent, name in removed:
                changed_directories.append(parent)
                trio.lowlevel.spawn_system_task(self._invalidate_entry, parent, name)
        elif isinstance(p, CreateParameters) and p.name:
            changed_directories.append(p.parent)
        elif isinstance(p, LinkParameters):
            changed_directories.append(p.new_parent)
            self._invalidate(cbd.iopb.target_file_object.inode, attr_only=True)  # its link count
        for directory in changed_directories:
            self._invalidate(directory, attr_only=True)

    @staticmethod
    async def _invalidate_entry(parent: int, name: bytes) -> None:
        """Drop a name the kernel caches, from a thread: the kernel may hold the directory until the
        request that changed it is answered."""
        try:
            await trio.to_thread.run_sync(pyfuse3.invalidate_entry, parent, name)
        except OSError as exc:  # no session (in-process use), or a name the kernel does not know
            log.debug("could not invalidate name %r in inode %d: %s", name, parent, exc)

    async def _invalidate_data(self, inode: int) -> None:
        """Drop a file's cached pages and attributes, from a thread: the kernel locks each page while it
        drops it, and a page may be locked by a READ this loop has yet to answer."""
        await trio.to_thread.run_sync(functools.partial(self._invalidate, inode, attr_only=False))

    def _invalidate(self, inode: int, *, attr_only: bool) -> None:
        try:
            pyfuse3.invalidate_inode(inode, attr_only=attr_only)
        except OSError as exc:  # no session (in-process use), an inode the kernel does not know, or an old kernel
            log.debug("could not invalidate inode %d: %s", inode, exc)

    async def _release(self, fh: int, params: CloseParameters) -> None:
        """CLOSE of a handle; its stream handle contexts go with it."""
        fo = self._files.pop(fh, None)
        if fo is not None:
            await self._never_fails(fo, params)
            self._stack.contexts.handle_closed(fh)

    async def _never_fails(self, fo: FileObject, params: Parameters) -> None:
        """CLEANUP and CLOSE: the caller's close(2) succeeds whatever happens below."""
        try:
            await self._call(fo, params, fo.opener or _KERNEL)
        except pyfuse3.FUSEError as exc:
            log.error("%s of %r failed with errno %d; the caller still succeeds", params.MAJOR.name, fo, exc.errno)
        except Exception:
            log.exception("internal error in %s of %r; the caller still succeeds", params.MAJOR.name, fo)

    # -- names and attributes ---------------------------------------------------

    @_boundary
    async def lookup(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        p = LookupParameters(parent_inode, name)
        await self._call(FileObject(parent_inode), p, _requestor(ctx))
        entry = self._entry(p.attributes)
        if len(self._last_lookup) > 4096:
            self._last_lookup.clear()
        self._last_lookup[ctx.pid] = (parent_inode, name, entry.st_ino)
        return entry

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        for inode, count in inode_list:
            try:
                if self._backend.forget(inode, count):
                    self._stack.contexts.inode_forgotten(inode)  # file and stream contexts go with it
                    self._stack.names.purge(inode)  # its number may be reused
            except Exception:
                log.exception("internal error forgetting inode %d (%d lookups)", inode, count)

    @_boundary
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        p = QueryInformationParameters()
        await self._call(FileObject(inode), p, _requestor(ctx))
        return self._entry(p.attributes)

    @_boundary
    async def setattr(
        self,
        inode: int,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: int | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        p = SetAttributesParameters(FileInformationClass.BASIC)
        if fields.update_size:
            p.size = attr.st_size
        if fields.update_mode:
            p.mode = attr.st_mode
        if fields.update_uid:
            p.uid = attr.st_uid
        if fields.update_gid:
            p.gid = attr.st_gid
        if fields.update_atime:
            p.atime_ns = attr.st_atime_ns
        if fields.update_mtime:
            p.mtime_ns = attr.st_mtime_ns
        if fields.update_ctime or not (
            fields.update_size
            or fields.update_mode
            or fields.update_uid
            or fields.update_gid
            or fields.update_atime
            or fields.update_mtime
        ):
            p.touch_change_time = True  # chown(f, -1, -1): the kernel sends a SETATTR that changes nothing
        if (
            p.size is not None
            and p.mode is None
            and p.uid is None
            and p.gid is None
            and p.atime_ns is None
            and p.mtime_ns is None
        ):
            p.information_class = FileInformationClass.END_OF_FILE
        fo = self._files.get(fh) if fh is not None else None
        await self._call(fo or FileObject(inode), p, _requestor(ctx))
        return self._entry(p.attributes)

    @_boundary
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        p = FileSystemControlParameters()
        await self._call(FileObject(inode), p, _requestor(ctx))
        if p.target is None:
            raise ValueError("readlink succeeded without a target")
        return p.target

    # -- making and removing names ----------------------------------------------

    async def _make(
        self, parent: int, params: CreateParameters, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        await self._call(FileObject(parent), params, _requestor(ctx))
        return self._entry(params.attributes)

    @_boundary
    async def mknod(
        self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        p = CreateParameters(
            CreateDisposition.CREATE, FileType(stat.S_IFMT(mode)), 0, parent_inode, name, stat.S_IMODE(mode), rdev
        )
        return await self._make(parent_inode, p, ctx)

    @_boundary
    async def mkdir(
        self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        p = CreateParameters(
            CreateDisposition.CREATE, FileType.DIRECTORY, os.O_DIRECTORY, parent_inode, name, stat.S_IMODE(mode)
        )
        return await self._make(parent_inode, p, ctx)

    @_boundary
    async def symlink(
        self, parent_inode: int, name: bytes, target: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        p = CreateParameters(
            CreateDisposition.CREATE, FileType.SYMLINK, 0, parent_inode, name, 0o777, link_target=target
        )
        return await self._make(parent_inode, p, ctx)

    @_boundary
    async def link(
        self, inode: int, new_parent_inode: int, new_name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        p = LinkParameters(new_parent_inode, new_name)
        await self._call(FileObject(inode), p, _requestor(ctx))
        # The kernel may keep the names it cached while the file had one (for entry_timeout): drop
        # them, so that an open through any of them is looked up again and gets it as its opened name.
        # They go after the answer: until then the kernel holds the file's lock and the new link's
        # directory, and a process that holds another of the file's directories (an unlink or a rename
        # there) may be waiting for the file's lock, so dropping a name before answering could deadlock.
        for parent, name in self._backend.links_of(inode):
            if (parent, name) != (new_parent_inode, new_name):
                trio.lowlevel.spawn_system_task(self._invalidate_entry, parent, name)
        return self._entry(p.attributes)

    @_boundary
    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        await self._call(FileObject(parent_inode), DispositionParameters(parent_inode, name, False), _requestor(ctx))

    @_boundary
    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        await self._call(FileObject(parent_inode), DispositionParameters(parent_inode, name, True), _requestor(ctx))

    @_boundary
    async def rename(
        self,
        parent_inode_old: int,
        name_old: bytes,
        parent_inode_new: int,
        name_new: bytes,
        flags: int,
        ctx: pyfuse3.RequestContext,
    ) -> None:
        p = RenameParameters(parent_inode_old, name_old, parent_inode_new, name_new, flags)
        await self._call(FileObject(parent_inode_old), p, _requestor(ctx))

    # -- open files ---------------------------------------------------------------

    @_boundary
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        req = _requestor(ctx)
        fo = FileObject(inode, None, flags, req)
        fo.link = self._link(inode, ctx)
        disposition = CreateDisposition.for_open(flags, exists=True)
        p = CreateParameters(disposition, FileType.REGULAR, flags, handle_requested=True)
        await self._call(fo, p, req)
        if p.attributes is not None:
            self._invalidate(inode, attr_only=True)  # opening changed its atime
        return self._file_info(fo, p)

    @_boundary
    async def create(
        self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: pyfuse3.RequestContext
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        req = _requestor(ctx)
        p = CreateParameters(
            CreateDisposition.for_open(flags, exists=False),
            FileType.REGULAR,
            flags,
            parent_inode,
            name,
            stat.S_IMODE(mode),
            handle_requested=True,
        )
        fo = FileObject(parent_inode, None, flags, req)
        fo.link = (parent_inode, name)
        await self._call(fo, p, req)
        entry = self._entry(p.attributes)
        fo.inode = entry.st_ino
        return self._file_info(fo, p), entry

    @_boundary
    async def read(self, fh: int, off: int, size: int) -> bytes:
        fo = self._file(fh)
        p = ReadParameters(off, size)
        await self._call(fo, p, fo.opener or _KERNEL)
        # pyfuse3 replies from any contiguous buffer (PyObject_GetBuffer), so the
        # backend's bytearray or memoryview goes out without a copy; its stub says bytes.
        return p.data if p.data is not None else b""  # type: ignore[return-value]

    @_boundary
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        fo = self._file(fh)
        try:
            cbd = await self._call(fo, WriteParameters(off, buf), fo.opener or _KERNEL)
        except pyfuse3.FUSEError:
            if not fo.uncached:
                self._unwritten_pages[fo.inode] += 1
                trio.lowlevel.spawn_system_task(self._drop_unwritten_pages, fo.inode)
            raise
        return cbd.io_status.information

    async def _drop_unwritten_pages(self, inode: int) -> None:
        """A failed write-back (a shared mapping's pages) leaves the pages in the kernel's cache, marked clean,
        and later reads would get data the file never had (data a filter refused): drop them. The kernel holds
        them until the WRITE is answered, so this runs after; opens meanwhile tell the kernel to drop them."""
        try:
            await self._invalidate_data(inode)
        finally:
            self._unwritten_pages[inode] -= 1
            if not self._unwritten_pages[inode]:
                del self._unwritten_pages[inode]

    @_boundary
    async def flush(self, fh: int) -> None:
        await self._never_fails(self._file(fh), CleanupParameters())

    @_boundary
    async def release(self, fh: int) -> None:
        await self._release(fh, CloseParameters())

    @_boundary
    async def fsync(self, fh: int, datasync: bool) -> None:
        fo = self._file(fh)
        await self._call(fo, FlushBuffersParameters(datasync), fo.opener or _KERNEL)

    # -- directories --------------------------------------------------------------

    @_boundary
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        req = _requestor(ctx)
        fo = FileObject(inode, None, os.O_RDONLY | os.O_DIRECTORY, req)
        fo.link = self._link(inode, ctx)
        p = CreateParameters(CreateDisposition.OPEN, FileType.DIRECTORY, fo.flags, handle_requested=True)
        await self._call(fo, p, req)
        return self._opened(fo, p)

    @_boundary
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        fo = self._file(fh)
        p = DirectoryControlParameters(start_id)
        await self._call(fo, p, fo.opener or _KERNEL)
        taken: list[int] = []
        try:
            for entry in p.entries:
                if not pyfuse3.readdir_reply(token, entry.name, self._entry(entry.attributes), entry.next_offset):
                    break
                if entry.name != b"." and entry.name != b"..":
                    taken.append(entry.attributes.ino)  # the kernel counts a lookup for each
        finally:
            self._backend.commit_listing(fh, taken)

    @_boundary
    async def releasedir(self, fh: int) -> None:
        await self._release(fh, CloseParameters(directory=True))

    @_boundary
    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        fo = self._file(fh)
        await self._call(fo, FlushBuffersParameters(datasync, directory=True), fo.opener or _KERNEL)

    # -- volume -------------------------------------------------------------------

    @_boundary
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        p = QueryVolumeInformationParameters()
        await self._call(FileObject(pyfuse3.ROOT_INODE), p, _requestor(ctx))
        s = p.statistics
        if s is None:
            raise ValueError("statfs succeeded without statistics")
        out = pyfuse3.StatvfsData()
        out.f_bsize = s.block_size
        out.f_frsize = s.fragment_size
        out.f_blocks = s.blocks
        out.f_bfree = s.blocks_free
        out.f_bavail = s.blocks_available
        out.f_files = s.files
        out.f_ffree = s.files_free
        out.f_favail = s.files_available
        out.f_namemax = s.name_max
        return out

    # -- extended attributes --------------------------------------------------------

    @_boundary
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        p = QueryEaParameters(EaMinor.GET, name)
        await self._call(FileObject(inode), p, _requestor(ctx))
        if p.value is None:
            raise ValueError("getxattr succeeded without a value")
        return p.value

    @_boundary
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> Sequence[bytes]:
        p = QueryEaParameters(EaMinor.LIST)
        await self._call(FileObject(inode), p, _requestor(ctx))
        return p.names or []

    @_boundary
    async def setxattr(self, inode: int, name: bytes, value: bytes, ctx: pyfuse3.RequestContext) -> None:
        await self._call(FileObject(inode), SetEaParameters(EaMinor.SET, name, value), _requestor(ctx))

    @_boundary
    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        await self._call(FileObject(inode), SetEaParameters(EaMinor.REMOVE, name), _requestor(ctx))

    @_boundary
    async def access(self, inode: int, mode: int, ctx: pyfuse3.RequestContext) -> bool:
        await self._call(FileObject(inode), AccessParameters(mode), _requestor(ctx))
        return True
