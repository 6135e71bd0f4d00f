"""The passthrough backend: the bottom of every stack, doing each request on a real directory.

Where it sits: stage (4) of the data flow. The instance stack hands it a
:class:`~fltfuse.CallbackData`; it performs the request on the backing
directory (the ext4 mounted from the loop device, or a plain directory as a
fallback), fills the output fields of the parameters and ``io_status``, and
returns. An ``OSError`` from the file system becomes the matching status, so
the caller of the mount gets ext4's own errno.

Windows counterpart: the file system driver under FltMgr (ntfs.sys).

How it stays as correct as the ext4 under it:

* Every inode the kernel knows is pinned by an ``O_PATH`` descriptor, so its
  number cannot be reused while the kernel may still send requests for it, and
  renames, hard links and unlinked-but-open files need no path bookkeeping.
  The kernel's lookup count decides when the pin is dropped (FORGET).
* Every open gets a descriptor of its own, opened with the caller's flags
  (never one shared descriptor per inode), and new objects get the caller's
  uid/gid (and the parent's gid in a set-gid directory).
* Directory offsets are ext4's own ``d_off`` cookies (``getdents64``), so a
  listing resumed at an offset neither skips nor repeats entries.
* Nothing long blocks the event loop: reads first try ``RWF_NOWAIT`` (a page
  cache hit) inline and go to a worker thread only on a miss; fsync always runs
  in a worker thread.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections.abc import Callable
from typing import Any

import trio

from .._callback_data import (
    AccessParameters,
    CallbackData,
    CleanupParameters,
    CloseParameters,
    CreateDisposition,
    CreateParameters,
    DirectoryControlParameters,
    DirectoryEntry,
    DispositionParameters,
    EaMinor,
    FileAttributes,
    FileSystemControlParameters,
    FileType,
    FlushBuffersParameters,
    LinkParameters,
    LookupParameters,
    Parameters,
    QueryEaParameters,
    QueryInformationParameters,
    QueryVolumeInformationParameters,
    ReadParameters,
    RenameParameters,
    SetAttributesParameters,
    SetEaParameters,
    VolumeStatistics,
    WriteParameters,
)
from .._status import status_from_errno
from . import _syscalls

log = logging.getLogger(__name__)

ROOT_INODE = 1
_PIN_FLAGS = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
# Flags the kernel has already acted on, or that must not reach the backing descriptor
# (O_TRUNC does reach it: the kernel sends it with OPEN, it does not truncate first):
# O_APPEND (the kernel computes append offsets; a shared-mmap writeback through an
# O_APPEND descriptor would land at the end), O_DIRECT (the kernel bypasses its own
# cache; the backing write need not be aligned), O_NOFOLLOW (we open a /proc magic link).
_STRIP_ON_OPEN = os.O_CREAT | os.O_EXCL | os.O_NOCTTY | os.O_APPEND | os.O_DIRECT | os.O_NOFOLLOW
_STRIP_ON_CREATE = os.O_APPEND | os.O_DIRECT


class _Inode:
    """A pinned inode: its O_PATH descriptor and the kernel's lookup count."""

    __slots__ = ("fd", "lookups", "proc")

    def __init__(self, fd: int, lookups: int):
        self.fd = fd
        self.proc = f"/proc/self/fd/{fd}"
        self.lookups = lookups


class _DirectoryHandle:
    """An open directory: its descriptor and the last batch of entries read.

    The kernel takes only as many entries as fit its buffer and asks again from
    the last one it took; the rest of the batch is kept (with pins for inodes
    the kernel did not know) so the next request is served without re-reading.
    """

    __slots__ = ("batch", "fd", "ino", "pins", "reader", "resume")

    def __init__(self, fd: int, ino: int):
        self.fd = fd
        self.ino = ino
        self.reader = _syscalls.DirentReader()
        self.batch: list[DirectoryEntry] = []
        self.resume: dict[int, int] = {}  # offset -> index into batch
        self.pins: dict[int, int] = {}  # ino -> O_PATH fd for entries of the batch not yet known

    def drop_batch(self) -> None:
        for fd in self.pins.values():
            os.close(fd)
        self.pins.clear()
        self.batch = []
        self.resume.clear()


class PassthroughBackend:
    """Performs requests on the backing directory ``root``.

    ``dispatch`` never raises for a file-system error: it sets
    ``io_status.status``. Other exceptions (bugs) propagate to the kernel
    adapter's boundary.
    """

    def __init__(self, root: str):
        fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        st = os.fstat(fd)
        self.root = root
        self._root_ino = st.st_ino
        self._dev = st.st_dev
        self._inodes: dict[int, _Inode] = {ROOT_INODE: _Inode(fd, 1)}
        self._dirs: dict[int, _DirectoryHandle] = {}
        self._nowait = True
        self._am_root = os.geteuid() == 0
        self._sync: dict[type[Parameters], Callable[[CallbackData, Any], None]] = {
            LookupParameters: self._lookup,
            CreateParameters: self._create,
            QueryInformationParameters: self._query_information,
            SetAttributesParameters: self._set_attributes,
            RenameParameters: self._rename,
            LinkParameters: self._link,
            DispositionParameters: self._disposition,
            FileSystemControlParameters: self._readlink,
            DirectoryControlParameters: self._read_directory,
            QueryEaParameters: self._query_ea,
            SetEaParameters: self._set_ea,
            CleanupParameters: self._cleanup,
            CloseParameters: self._close,
            QueryVolumeInformationParameters: self._statfs,
            AccessParameters: self._access,
            WriteParameters: self._write,
        }
        self._async: dict[type[Parameters], Callable[[CallbackData, Any], Any]] = {
            ReadParameters: self._read,
            FlushBuffersParameters: self._flush_buffers,
        }

    # -- entry points ---------------------------------------------------------

    async def dispatch(self, cbd: CallbackData) -> None:
        """Perform ``cbd`` and set its ``io_status`` and output parameters."""
        params = cbd.iopb.parameters
        try:
            handler = self._sync.get(type(params))
            if handler is not None:
                handler(cbd, params)
            else:
                await self._async[type(params)](cbd, params)
        except OSError as exc:
            cbd.io_status.status = status_from_errno(exc.errno or errno.EIO)

    def forget(self, ino: int, count: int) -> None:
        """The kernel dropped ``count`` lookups of ``ino``; unpin it at zero."""
        if ino == ROOT_INODE:
            return
        node = self._inodes.get(ino)
        if node is None:
            log.error("forget of unknown inode %d", ino)
            return
        node.lookups -= count
        if node.lookups <= 0:
            del self._inodes[ino]
            os.close(node.fd)

    def remember_listed(self, handle: int, entry: DirectoryEntry) -> None:
        """The kernel took ``entry`` from a listing of ``handle``: count one lookup of it."""
        ino = entry.attributes.ino
        node = self._inodes.get(ino)
        if node is not None:
            node.lookups += 1
            return
        dh = self._dirs[handle]
        fd = dh.pins.pop(ino, None)
        if fd is None:  # served again after the kernel forgot it: pin it by name
            fd = os.open(entry.name, _PIN_FLAGS, dir_fd=dh.fd)
            if os.fstat(fd).st_ino != ino:
                os.close(fd)
                raise OSError(errno.ESTALE, f"{entry.name!r} changed while it was listed")
        self._inodes[ino] = _Inode(fd, 1)

    def known_inodes(self) -> int:
        """How many inodes are pinned (the kernel's working set), root included."""
        return len(self._inodes)

    def close(self) -> None:
        """Release every descriptor (after unmount)."""
        for dh in self._dirs.values():
            dh.drop_batch()
        self._dirs.clear()
        for node in self._inodes.values():
            os.close(node.fd)
        self._inodes.clear()

    # -- helpers --------------------------------------------------------------

    def _node(self, ino: int) -> _Inode:
        node = self._inodes.get(ino)
        if node is None:
            raise OSError(errno.ESTALE, f"inode {ino} is not known")
        return node

    def _attributes(self, st: os.stat_result) -> FileAttributes:
        ino = ROOT_INODE if st.st_ino == self._root_ino else st.st_ino
        return FileAttributes.from_stat(st, ino)

    def _pin(self, dir_fd: int, name: bytes | str, st: os.stat_result | None = None) -> FileAttributes:
        """Count one kernel lookup of ``dir_fd/name`` and return its attributes."""
        if st is None:
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        if st.st_ino == self._root_ino:
            self._inodes[ROOT_INODE].lookups += 1
            return self._attributes(st)
        node = self._inodes.get(st.st_ino)
        if node is None:
            fd = os.open(name, _PIN_FLAGS, dir_fd=dir_fd)
            st = os.fstat(fd)  # the object we pinned, even if the name changed meanwhile
            if st.st_dev != self._dev:
                os.close(fd)
                raise OSError(errno.EXDEV, "another file system is mounted inside the backing directory")
            node = self._inodes.get(st.st_ino)
            if node is not None:
                os.close(fd)
            else:
                self._inodes[st.st_ino] = node = _Inode(fd, 0)
        node.lookups += 1
        return self._attributes(st)

    def _give_to_requestor(self, cbd: CallbackData, parent: _Inode, name: bytes, fd: int | None) -> None:
        """Make a new object owned by the caller, as ext4 would for a process with its ids."""
        req = cbd.requestor
        if not self._am_root or (req.uid == 0 and req.gid == 0):
            return
        gid = req.gid
        if os.fstat(parent.fd).st_mode & stat.S_ISGID:
            gid = -1  # inherits the directory's group, as ext4 does
        if fd is not None:
            os.fchown(fd, req.uid, gid)
        else:
            os.chown(name, req.uid, gid, dir_fd=parent.fd, follow_symlinks=False)

    # -- handlers -------------------------------------------------------------

    def _lookup(self, cbd: CallbackData, p: LookupParameters) -> None:
        parent = self._node(p.parent)
        if p.parent == ROOT_INODE and p.name == b"..":
            p.attributes = self._pin(parent.fd, b".")
        else:
            p.attributes = self._pin(parent.fd, p.name)

    def _create(self, cbd: CallbackData, p: CreateParameters) -> None:
        if p.disposition == CreateDisposition.OPEN or p.disposition == CreateDisposition.OVERWRITE:
            self._open(cbd, p)
            return
        parent = self._node(p.parent)
        name = p.name
        ftype = p.file_type
        fd = None
        if ftype == FileType.REGULAR and p.handle_requested:
            flags = (p.flags & ~_STRIP_ON_CREATE) | os.O_CREAT | os.O_CLOEXEC
            if p.disposition == CreateDisposition.CREATE:
                flags |= os.O_EXCL
            fd = os.open(name, flags, p.mode, dir_fd=parent.fd)
        elif ftype == FileType.DIRECTORY:
            os.mkdir(name, p.mode, dir_fd=parent.fd)
        elif ftype == FileType.SYMLINK:
            os.symlink(p.link_target, name, dir_fd=parent.fd)
        else:
            os.mknod(name, p.mode | ftype, p.rdev, dir_fd=parent.fd)
        try:
            self._give_to_requestor(cbd, parent, name, fd)
            if fd is not None and p.mode & (stat.S_ISUID | stat.S_ISGID):
                os.fchmod(fd, p.mode)  # chown cleared them
            p.attributes = self._pin(parent.fd, name)
        except BaseException:
            if fd is not None:
                os.close(fd)
            raise
        p.handle = fd

    def _open(self, cbd: CallbackData, p: CreateParameters) -> None:
        node = self._node(cbd.iopb.target_file_object.inode)
        if p.file_type == FileType.DIRECTORY:
            fd = os.open(node.proc, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            self._dirs[fd] = _DirectoryHandle(fd, cbd.iopb.target_file_object.inode)
        else:
            fd = os.open(node.proc, (p.flags & ~_STRIP_ON_OPEN) | os.O_CLOEXEC)
        p.handle = fd

    def _query_information(self, cbd: CallbackData, p: QueryInformationParameters) -> None:
        p.attributes = self._attributes(os.fstat(self._node(cbd.iopb.target_file_object.inode).fd))

    def _set_attributes(self, cbd: CallbackData, p: SetAttributesParameters) -> None:
        fo = cbd.iopb.target_file_object
        node = self._node(fo.inode)
        if p.mode is not None:
            os.chmod(node.proc, stat.S_IMODE(p.mode))
        if p.uid is not None or p.gid is not None:
            os.chown(node.proc, -1 if p.uid is None else p.uid, -1 if p.gid is None else p.gid)
        if p.size is not None:
            if fo.handle is not None and fo.handle not in self._dirs:
                os.ftruncate(fo.handle, p.size)
            else:
                os.truncate(node.proc, p.size)
        if p.atime_ns is not None or p.mtime_ns is not None:
            _syscalls.utimensat(node.proc.encode(), p.atime_ns, p.mtime_ns)
        p.attributes = self._attributes(os.fstat(node.fd))

    def _rename(self, cbd: CallbackData, p: RenameParameters) -> None:
        old = self._node(p.parent).fd
        new = self._node(p.new_parent).fd
        if p.flags:
            _syscalls.renameat2(old, p.name, new, p.new_name, p.flags)
        else:
            os.rename(p.name, p.new_name, src_dir_fd=old, dst_dir_fd=new)

    def _link(self, cbd: CallbackData, p: LinkParameters) -> None:
        node = self._node(cbd.iopb.target_file_object.inode)
        new_parent = self._node(p.new_parent)
        os.link(node.proc, p.new_name, dst_dir_fd=new_parent.fd, follow_symlinks=True)
        p.attributes = self._pin(new_parent.fd, p.new_name)

    def _disposition(self, cbd: CallbackData, p: DispositionParameters) -> None:
        parent = self._node(p.parent)
        if p.directory:
            os.rmdir(p.name, dir_fd=parent.fd)
        else:
            os.unlink(p.name, dir_fd=parent.fd)

    def _readlink(self, cbd: CallbackData, p: FileSystemControlParameters) -> None:
        p.target = os.readlink(b"", dir_fd=self._node(cbd.iopb.target_file_object.inode).fd)

    def _read_directory(self, cbd: CallbackData, p: DirectoryControlParameters) -> None:
        dh = self._dirs[cbd.iopb.target_file_object.handle]  # type: ignore[index]
        index = dh.resume.get(p.offset) if p.offset else None
        if index is None or index == len(dh.batch):
            self._read_batch(dh, p.offset)
            index = 0
        p.entries = dh.batch[index:]

    def _read_batch(self, dh: _DirectoryHandle, offset: int) -> None:
        dh.drop_batch()
        known = self._inodes
        batch = dh.batch
        for name, d_ino, d_off in dh.reader.read(dh.fd, offset):
            if name == b"." or name == b"..":
                if name == b"." or dh.ino == ROOT_INODE:
                    st = os.fstat(dh.fd)
                else:
                    st = os.stat(b"..", dir_fd=dh.fd)
                batch.append(DirectoryEntry(name, self._attributes(st), d_off))
                continue
            try:
                if d_ino in known:
                    st = os.stat(name, dir_fd=dh.fd, follow_symlinks=False)
                else:
                    fd = os.open(name, _PIN_FLAGS, dir_fd=dh.fd)
                    st = os.fstat(fd)
                    if st.st_ino in known or st.st_ino in dh.pins or st.st_dev != self._dev:
                        os.close(fd)
                    else:
                        dh.pins[st.st_ino] = fd
            except FileNotFoundError:
                continue  # removed since getdents: a listing need not show it
            if st.st_dev != self._dev:
                continue  # a mount point inside the backing directory: not ours to show
            batch.append(DirectoryEntry(name, self._attributes(st), d_off))
        dh.resume = {entry.next_offset: i + 1 for i, entry in enumerate(batch)}

    def _query_ea(self, cbd: CallbackData, p: QueryEaParameters) -> None:
        path = self._node(cbd.iopb.target_file_object.inode).proc
        if p.minor == EaMinor.LIST:
            p.names = [os.fsencode(name) for name in os.listxattr(path)]
        else:
            p.value = os.getxattr(path, p.name)

    def _set_ea(self, cbd: CallbackData, p: SetEaParameters) -> None:
        path = self._node(cbd.iopb.target_file_object.inode).proc
        if p.minor == EaMinor.REMOVE:
            os.removexattr(path, p.name)
        else:
            os.setxattr(path, p.name, p.value)

    def _cleanup(self, cbd: CallbackData, p: CleanupParameters) -> None:
        """close(2) of one descriptor: ext4 has nothing to do until the handle goes."""

    def _close(self, cbd: CallbackData, p: CloseParameters) -> None:
        fd = cbd.iopb.target_file_object.handle
        assert fd is not None
        dh = self._dirs.pop(fd, None)
        if dh is not None:
            dh.drop_batch()
        os.close(fd)

    def _statfs(self, cbd: CallbackData, p: QueryVolumeInformationParameters) -> None:
        v = os.fstatvfs(self._inodes[ROOT_INODE].fd)
        p.statistics = VolumeStatistics(
            v.f_bsize, v.f_frsize, v.f_blocks, v.f_bfree, v.f_bavail, v.f_files, v.f_ffree, v.f_favail, v.f_namemax
        )

    def _access(self, cbd: CallbackData, p: AccessParameters) -> None:
        st = os.fstat(self._node(cbd.iopb.target_file_object.inode).fd)
        if not _permits(st, p.mode, cbd.requestor.uid, _groups_of(cbd.requestor.pid, cbd.requestor.gid)):
            raise OSError(errno.EACCES, "access denied")

    def _write(self, cbd: CallbackData, p: WriteParameters) -> None:
        fd = cbd.iopb.target_file_object.handle
        data = memoryview(p.data)
        offset = p.offset
        done = 0
        while done < len(data):
            try:
                n = os.pwrite(fd, data[done:], offset + done)  # type: ignore[arg-type]
            except OSError:
                if done:
                    break  # a short write, like ext4's on ENOSPC after some bytes
                raise
            if n == 0:
                break
            done += n
        cbd.io_status.information = done

    async def _read(self, cbd: CallbackData, p: ReadParameters) -> None:
        fd = cbd.iopb.target_file_object.handle
        assert fd is not None
        buf = bytearray(p.length)
        n = 0
        if self._nowait:
            try:
                n = os.preadv(fd, [buf], p.offset, os.RWF_NOWAIT)
            except BlockingIOError:
                n = 0
            except OSError as exc:
                if exc.errno != errno.EOPNOTSUPP:
                    raise
                self._nowait = False
        if n < p.length and (n == 0 or p.offset + n < os.fstat(fd).st_size):
            view = memoryview(buf)[n:]
            n += await trio.to_thread.run_sync(os.preadv, fd, [view], p.offset + n)
        p.data = buf if n == p.length else memoryview(buf)[:n]
        cbd.io_status.information = n

    async def _flush_buffers(self, cbd: CallbackData, p: FlushBuffersParameters) -> None:
        fd = cbd.iopb.target_file_object.handle
        assert fd is not None
        sync: Callable[[int], None] = os.fdatasync if p.datasync else os.fsync
        await trio.to_thread.run_sync(sync, fd)


def _groups_of(pid: int, gid: int) -> set[int]:
    groups = {gid}
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"Groups:"):
                    groups.update(int(g) for g in line.split()[1:])
    except OSError:
        pass
    return groups


def _permits(st: os.stat_result, mode: int, uid: int, groups: set[int]) -> bool:
    """access(2) by mode bits, as the kernel checks it without ACLs."""
    if mode == os.F_OK:
        return True
    if uid == 0:
        return not (mode & os.X_OK) or stat.S_ISDIR(st.st_mode) or bool(st.st_mode & 0o111)
    if st.st_uid == uid:
        bits = (st.st_mode >> 6) & 7
    elif st.st_gid in groups:
        bits = (st.st_mode >> 3) & 7
    else:
        bits = st.st_mode & 7
    return (bits & mode) == mode
