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
  cache hit) inline; a miss of more than 16 KiB goes to a worker thread (a
  smaller one costs one disk read, less than the hand-off); fsync always runs
  in a worker thread.
"""

from __future__ import annotations

import errno
import logging
import os
import resource
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
from .._process import groups_of, has_capability
from .._status import status_from_errno
from . import _syscalls
from .inode_table import ROOT_INODE, InodeTable

log = logging.getLogger(__name__)

# Flags the kernel has already acted on, or that must not reach the backing descriptor
# (O_TRUNC does reach it: the kernel sends it with OPEN, it does not truncate first):
# O_APPEND (the kernel computes append offsets; a shared-mmap writeback through an
# O_APPEND descriptor would land at the end), O_DIRECT (the kernel bypasses its own
# cache; page-cache writeback may go through any writable handle, with a length that
# is not block-aligned), O_NOFOLLOW (we open a /proc magic link).
_STRIP_ON_OPEN = os.O_CREAT | os.O_EXCL | os.O_NOCTTY | os.O_APPEND | os.O_DIRECT | os.O_NOFOLLOW
_STRIP_ON_CREATE = os.O_APPEND | os.O_DIRECT
_DIRECT_IO_ALIGNMENT = 512  # the loop device's logical block size: ext4's O_DIRECT offset alignment
_CAP_SYS_ADMIN = 21
_INLINE_READ = 32 * 1024  # a cache miss this small is read in the event loop (BENCHMARKS.md: randread, encryption)


class _DirectoryHandle:
    """An open directory: its descriptor, the last batch of entries read, and what is reserved.

    The kernel takes only as many entries as fit its buffer and asks again from
    the last one it took; the rest of the batch is kept so the next request is
    served without re-reading. Every entry served has one lookup reserved for
    it (the kernel counts one for each entry it takes); ``commit_listing``
    keeps those the kernel took and releases the rest.
    """

    __slots__ = ("batch", "fd", "ino", "reader", "reserved", "resume")

    def __init__(self, fd: int, ino: int):
        self.fd = fd
        self.ino = ino
        self.reader = _syscalls.DirentReader()
        self.batch: list[DirectoryEntry] = []
        self.resume: dict[int, int] = {}  # offset -> index into batch
        self.reserved: dict[int, int] = {}  # inode -> lookups reserved by the last serve


class PassthroughBackend:
    """Performs requests on the backing directory ``root``.

    ``dispatch`` never raises for a file-system error: it sets
    ``io_status.status``. Other exceptions (bugs) propagate to the kernel
    adapter's boundary.
    """

    def __init__(self, root: str):
        fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        self._root_path = os.fsencode(os.path.realpath(root)).rstrip(b"/")  # what /proc/self/fd shows for the root
        st = os.fstat(fd)
        self._dev = st.st_dev
        self._mount_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        self._table = InodeTable(fd, st.st_ino, self._mount_fd, budget=soft - max(1024, soft // 4))
        self._dirs: dict[int, _DirectoryHandle] = {}
        self._files: set[int] = set()  # open file handles (descriptors)
        self._direct: set[int] = set()  # the ones opened with O_DIRECT
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

    def add_lookups(self, ino: int, count: int) -> bool:
        """Count ``count`` more lookups of the known inode ``ino`` (a filter opened it by id); False if unknown."""
        return self._table.add_lookups(ino, count)

    def forget(self, ino: int, count: int) -> bool:
        """The kernel dropped ``count`` lookups of ``ino``; True if it no longer knows the inode."""
        return self._table.forget(ino, count)

    def commit_listing(self, handle: int, taken: list[int]) -> None:
        """The kernel took the entries ``taken`` (inode numbers) from the last listing of ``handle``."""
        dh = self._dirs[handle]
        reserved = dh.reserved
        for ino in taken:
            left = reserved.get(ino, 0)
            if left:
                reserved[ino] = left - 1
            elif not self._table.add_lookups(ino, 1):
                log.warning("a listing of handle %d showed inode %d, which the backend never served", handle, ino)
        self._release_reservations(dh)

    def name_of(self, ino: int) -> bytes:
        """The file system's name of ``ino``: its path from the volume root (b"" for the root, else b"/a/b").

        A directory has one name, which the kernel keeps for its pinned
        descriptor (``/proc/self/fd``). A file may have several (hard links):
        the answer is the most recent name the kernel reached it through that
        still names it, checked with a stat; if none does (renamed behind the
        volume's back), the name the kernel keeps for its pinned descriptor,
        checked likewise. Raises FileNotFoundError for a file whose last name
        was removed (still open) and for one no name found still names.
        """
        if ino == ROOT_INODE:
            return b""
        table = self._table
        fd = table.fd(ino)
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            if st.st_nlink == 0:
                raise FileNotFoundError(errno.ENOENT, f"directory inode {ino} was removed")
            path = self._descriptor_name(fd)
            if path is not None:
                return path
            raise FileNotFoundError(errno.ENOENT, f"directory inode {ino} is not under the volume root")
        for parent, name in table.links(ino):
            if self.is_name_of(parent, name, ino):
                return self.name_of(parent) + b"/" + name
            table.drop_link(ino, parent, name)
        path = self._descriptor_name(table.fd(ino))
        if path is not None and self.is_name_of(ROOT_INODE, path[1:], ino):
            return path
        raise FileNotFoundError(errno.ENOENT, f"inode {ino} has no name the volume knows (nlink {st.st_nlink})")

    def _descriptor_name(self, fd: int) -> bytes | None:
        """The path the kernel keeps for descriptor ``fd`` (``/proc/self/fd``), from the volume root, if under it."""
        path = os.readlink(f"/proc/self/fd/{fd}".encode())
        root = self._root_path
        return path[len(root) :] if path.startswith(root + b"/") else None

    def links_of(self, ino: int) -> list[tuple[int, bytes]]:
        """The (directory, name) pairs the kernel reached non-directory ``ino`` through, most recent first."""
        return self._table.links(ino)

    def is_name_of(self, parent: int, name: bytes, ino: int) -> bool:
        """Whether ``parent/name`` (``name`` may be a relative path) names ``ino`` now."""
        try:
            st = os.stat(name, dir_fd=self._table.fd(parent), follow_symlinks=False)
        except OSError:
            return False
        return self._table.node_id(st.st_ino) == ino and st.st_dev == self._dev

    def known_inodes(self) -> int:
        """How many inodes the kernel holds lookups on, the root included."""
        return len(self._table)

    def close(self) -> None:
        """Release every descriptor (after unmount: the kernel may not have sent every CLOSE)."""
        for fd in [*self._dirs, *self._files]:
            os.close(fd)
        self._dirs.clear()
        self._files.clear()
        self._direct.clear()
        self._table.close()
        os.close(self._mount_fd)

    # -- helpers --------------------------------------------------------------

    def _attributes(self, st: os.stat_result) -> FileAttributes:
        return FileAttributes.from_stat(st, self._table.node_id(st.st_ino))

    def _pin(self, parent: int, name: bytes) -> FileAttributes:
        """Count one kernel lookup of ``parent/name`` and return its attributes."""
        dir_fd = self._table.fd(parent)
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        if st.st_dev != self._dev:
            raise OSError(errno.EXDEV, "another file system is mounted inside the backing directory")
        attributes = self._attributes(self._table.lookup(dir_fd, name, st))
        if not stat.S_ISDIR(attributes.mode):
            self._table.record_link(attributes.ino, parent, name)
        return attributes

    def _open(self, path: str | bytes, flags: int, mode: int = 0o777, dir_fd: int | None = None) -> int:
        """os.open that, out of descriptors, unpins some inodes and tries once more."""
        try:
            return os.open(path, flags, mode, dir_fd=dir_fd)
        except OSError as exc:
            if exc.errno != errno.EMFILE or not self._table.make_room(256):
                raise
        return os.open(path, flags, mode, dir_fd=dir_fd)

    def _keep_pinned(self, dir_fd: int, name: bytes) -> int | None:
        """Before a name goes away: pin its inode if the kernel knows it (it may be open). Returns it."""
        try:
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except OSError:
            return None
        ino = self._table.node_id(st.st_ino)
        self._table.keep_pinned(ino)
        return ino

    def _give_to_requestor(self, cbd: CallbackData, parent_fd: int, name: bytes, fd: int | None) -> None:
        """Make a new object owned by the caller, as ext4 would for a process with its ids."""
        req = cbd.requestor
        if not self._am_root or (req.uid == 0 and req.gid == 0):
            return
        gid = req.gid
        if os.fstat(parent_fd).st_mode & stat.S_ISGID:
            gid = -1  # inherits the directory's group, as ext4 does
        if fd is not None:
            os.fchown(fd, req.uid, gid)
        else:
            os.chown(name, req.uid, gid, dir_fd=parent_fd, follow_symlinks=False)

    # -- handlers -------------------------------------------------------------

    def _lookup(self, cbd: CallbackData, p: LookupParameters) -> None:
        name = b"." if p.parent == ROOT_INODE and p.name == b".." else p.name  # never above the volume
        p.attributes = self._pin(p.parent, name)

    def _create(self, cbd: CallbackData, p: CreateParameters) -> None:
        if p.disposition == CreateDisposition.OPEN or p.disposition == CreateDisposition.OVERWRITE:
            self._open_existing(cbd, p)
            return
        parent_fd = self._table.fd(p.parent)
        name = p.name
        ftype = p.file_type
        fd = None
        if ftype == FileType.REGULAR and p.handle_requested:
            flags = (p.flags & ~_STRIP_ON_CREATE) | os.O_CREAT | os.O_CLOEXEC
            if p.disposition == CreateDisposition.CREATE:
                flags |= os.O_EXCL
            fd = self._open(name, flags, p.mode, dir_fd=parent_fd)
        elif ftype == FileType.DIRECTORY:
            os.mkdir(name, p.mode, dir_fd=parent_fd)
        elif ftype == FileType.SYMLINK:
            os.symlink(p.link_target, name, dir_fd=parent_fd)
        else:
            os.mknod(name, p.mode | ftype, p.rdev, dir_fd=parent_fd)
        try:
            self._give_to_requestor(cbd, parent_fd, name, fd)
            if p.mode & (stat.S_ISUID | stat.S_ISGID) and ftype not in (FileType.DIRECTORY, FileType.SYMLINK):
                # chown cleared them (on any non-directory: files, fifos, mknod'ed nodes)
                if fd is not None:
                    os.fchmod(fd, p.mode)
                else:
                    os.chmod(name, p.mode, dir_fd=parent_fd)
            p.attributes = self._pin(p.parent, name)
        except BaseException:
            if fd is not None:
                os.close(fd)
            raise
        if fd is not None:
            self._opened(fd, p.flags)
        p.handle = fd
        fo = cbd.iopb.target_file_object
        fo.inode, fo.handle, fo.creating = p.attributes.ino, fd, False  # from here on (the posts) the new object

    def _open_existing(self, cbd: CallbackData, p: CreateParameters) -> None:
        path = self._table.proc(cbd.iopb.target_file_object.inode)
        if p.file_type == FileType.DIRECTORY:
            fd = self._open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            self._dirs[fd] = _DirectoryHandle(fd, cbd.iopb.target_file_object.inode)
        else:
            fd = self._open(path, (p.flags & ~_STRIP_ON_OPEN) | os.O_CLOEXEC)
            self._opened(fd, p.flags)
            if p.flags & os.O_ACCMODE != os.O_WRONLY and not p.flags & os.O_NOATIME:
                p.attributes = self._access_time(fd)
        fo = cbd.iopb.target_file_object
        p.handle, fo.handle, fo.creating = fd, fd, False

    def _access_time(self, fd: int) -> FileAttributes | None:
        """Let ext4 apply its atime rule (relatime, strictatime or noatime) as for a read.

        The kernel keeps a FUSE file's pages cached across opens, so reads it
        serves from its cache never reach ext4 and would never update atime. A
        read at the end of the file on the backing descriptor touches atime with
        no I/O and without changing ctime, exactly as ext4 does for any read.
        Returns the new attributes if the access time changed, else None.
        """
        before = os.fstat(fd)
        try:
            os.preadv(fd, [bytearray(1)], before.st_size, os.RWF_NOWAIT)
        except OSError:
            return None  # no RWF_NOWAIT on this file system: its own reads still update atime
        after = os.fstat(fd)
        return self._attributes(after) if after.st_atime_ns != before.st_atime_ns else None

    def _opened(self, fd: int, flags: int) -> None:
        self._files.add(fd)
        if flags & os.O_DIRECT:
            self._direct.add(fd)

    def _query_information(self, cbd: CallbackData, p: QueryInformationParameters) -> None:
        p.attributes = self._attributes(os.fstat(self._table.fd(cbd.iopb.target_file_object.inode)))

    def _set_attributes(self, cbd: CallbackData, p: SetAttributesParameters) -> None:
        fo = cbd.iopb.target_file_object
        path = self._table.proc(fo.inode)
        if p.mode is not None:
            os.chmod(path, stat.S_IMODE(p.mode))
        if p.uid is not None or p.gid is not None or p.touch_change_time:
            os.chown(path, -1 if p.uid is None else p.uid, -1 if p.gid is None else p.gid)
        if p.size is not None:
            if fo.handle is not None and fo.handle not in self._dirs:
                os.ftruncate(fo.handle, p.size)
            else:
                os.truncate(path, p.size)
        if p.atime_ns is not None or p.mtime_ns is not None:
            _syscalls.utimensat(path.encode(), p.atime_ns, p.mtime_ns)
        p.attributes = self._attributes(os.fstat(self._table.fd(fo.inode)))

    def _rename(self, cbd: CallbackData, p: RenameParameters) -> None:
        target = self._keep_pinned(self._table.fd(p.new_parent), p.new_name)  # a replaced target may still be open
        moved = self._keep_pinned(self._table.fd(p.parent), p.name)
        old = self._table.fd(p.parent)
        new = self._table.fd(p.new_parent)
        if p.flags:
            _syscalls.renameat2(old, p.name, new, p.new_name, p.flags)
        else:
            os.rename(p.name, p.new_name, src_dir_fd=old, dst_dir_fd=new)
        table = self._table
        if moved is not None:
            table.drop_link(moved, p.parent, p.name)
            table.record_link(moved, p.new_parent, p.new_name)
        if target is not None and target != moved:
            table.drop_link(target, p.new_parent, p.new_name)
            if p.flags & _syscalls.RENAME_EXCHANGE:
                table.record_link(target, p.parent, p.name)

    def _link(self, cbd: CallbackData, p: LinkParameters) -> None:
        path = self._table.proc(cbd.iopb.target_file_object.inode)
        new_parent_fd = self._table.fd(p.new_parent)
        os.link(path, p.new_name, dst_dir_fd=new_parent_fd, follow_symlinks=True)
        p.attributes = self._pin(p.new_parent, p.new_name)

    def _disposition(self, cbd: CallbackData, p: DispositionParameters) -> None:
        ino = self._keep_pinned(self._table.fd(p.parent), p.name)
        parent_fd = self._table.fd(p.parent)
        if p.directory:
            os.rmdir(p.name, dir_fd=parent_fd)
        else:
            os.unlink(p.name, dir_fd=parent_fd)
        if ino is not None:
            self._table.drop_link(ino, p.parent, p.name)

    def _readlink(self, cbd: CallbackData, p: FileSystemControlParameters) -> None:
        p.target = os.readlink(b"", dir_fd=self._table.fd(cbd.iopb.target_file_object.inode))

    def _read_directory(self, cbd: CallbackData, p: DirectoryControlParameters) -> None:
        dh = self._dirs[cbd.iopb.target_file_object.handle]  # type: ignore[index]
        self._release_reservations(dh)
        index = dh.resume.get(p.offset) if p.offset else None
        if index is None or index == len(dh.batch):
            self._read_batch(dh, p.offset)
            index = 0
        served = self._serve(dh, index)
        while not served and dh.batch:  # an empty reply would end the listing: read on
            self._read_batch(dh, dh.batch[-1].next_offset)
            served = self._serve(dh, 0)
        p.entries = served

    def _serve(self, dh: _DirectoryHandle, index: int) -> list[DirectoryEntry]:
        """The batch from ``index``, each entry with one lookup reserved, less entries gone since."""
        served = []
        reserved = dh.reserved
        for entry in dh.batch[index:]:
            name = entry.name
            if name != b"." and name != b"..":
                ino = entry.attributes.ino
                if not self._table.reserve_listed(dh.fd, name, ino):
                    continue  # gone or replaced since it was read: a listing need not show it
                if not stat.S_ISDIR(entry.attributes.mode):
                    self._table.record_link(ino, dh.ino, name)
                reserved[ino] = reserved.get(ino, 0) + 1
            served.append(entry)
        return served

    def _release_reservations(self, dh: _DirectoryHandle) -> None:
        for ino, count in dh.reserved.items():
            if count:
                self._table.forget(ino, count)
        dh.reserved.clear()

    def _read_batch(self, dh: _DirectoryHandle, offset: int) -> None:
        batch: list[DirectoryEntry] = []
        for name, _d_ino, d_off in dh.reader.read(dh.fd, offset):
            try:
                if name == b"..":
                    st = os.fstat(dh.fd) if dh.ino == ROOT_INODE else os.stat(b"..", dir_fd=dh.fd)
                elif name == b".":
                    st = os.fstat(dh.fd)
                else:
                    st = os.stat(name, dir_fd=dh.fd, follow_symlinks=False)
            except FileNotFoundError:
                continue  # removed since getdents: a listing need not show it
            if st.st_dev != self._dev:
                continue  # a mount point inside the backing directory: not ours to show
            batch.append(DirectoryEntry(name, self._attributes(st), d_off))
        dh.batch = batch
        dh.resume = {entry.next_offset: i + 1 for i, entry in enumerate(batch)}

    def _query_ea(self, cbd: CallbackData, p: QueryEaParameters) -> None:
        path = self._table.proc(cbd.iopb.target_file_object.inode)
        if p.minor == EaMinor.LIST:
            names = [os.fsencode(name) for name in os.listxattr(path)]
            if not has_capability(cbd.requestor.pid, cbd.requestor.uid, _CAP_SYS_ADMIN):
                names = [n for n in names if not n.startswith(b"trusted.")]  # as ext4 lists them
            p.names = names
        else:
            p.value = os.getxattr(path, p.name)

    def _set_ea(self, cbd: CallbackData, p: SetEaParameters) -> None:
        path = self._table.proc(cbd.iopb.target_file_object.inode)
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
            self._release_reservations(dh)
        self._files.discard(fd)
        self._direct.discard(fd)
        os.close(fd)
        cbd.iopb.target_file_object.closed = True

    def _statfs(self, cbd: CallbackData, p: QueryVolumeInformationParameters) -> None:
        v = os.fstatvfs(self._table.fd(ROOT_INODE))
        p.statistics = VolumeStatistics(
            v.f_bsize, v.f_frsize, v.f_blocks, v.f_bfree, v.f_bavail, v.f_files, v.f_ffree, v.f_favail, v.f_namemax
        )

    def _access(self, cbd: CallbackData, p: AccessParameters) -> None:
        st = os.fstat(self._table.fd(cbd.iopb.target_file_object.inode))
        if not _permits(st, p.mode, cbd.requestor.uid, groups_of(cbd.requestor.pid, cbd.requestor.gid)):
            raise OSError(errno.EACCES, "access denied")

    def _check_direct_io(self, fd: int, offset: int, length: int = 0) -> None:
        """ext4 refuses O_DIRECT I/O whose offset or length is not block-aligned; so do we.

        A READ's ``length`` is checked too (the kernel's page-cache reads come
        in whole pages, so only a caller's O_DIRECT read can be unaligned). A
        WRITE's is not: page-cache writeback of a partial last page may come
        through any writable handle, O_DIRECT ones included, and FUSE does not
        tell it apart from the caller's write.
        """
        if fd in self._direct and (offset | length) % _DIRECT_IO_ALIGNMENT:
            raise OSError(errno.EINVAL, "O_DIRECT I/O at an unaligned offset or length")

    def _write(self, cbd: CallbackData, p: WriteParameters) -> None:
        fd = cbd.iopb.target_file_object.handle
        assert fd is not None
        offset = p.offset
        if self._direct:
            self._check_direct_io(fd, offset)
        data = memoryview(p.data)
        done = 0
        while done < len(data):
            try:
                n = os.pwrite(fd, data[done:], offset + done)
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
        if self._direct:
            self._check_direct_io(fd, p.offset, p.length)
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
            if p.length - n <= _INLINE_READ:
                n += os.preadv(fd, [view], p.offset + n)  # one small disk read: less than a thread hand-off
            else:
                n += await trio.to_thread.run_sync(os.preadv, fd, [view], p.offset + n)
        p.data = buf if n == p.length else memoryview(buf)[:n]
        cbd.io_status.information = n

    async def _flush_buffers(self, cbd: CallbackData, p: FlushBuffersParameters) -> None:
        fd = cbd.iopb.target_file_object.handle
        assert fd is not None
        sync: Callable[[int], None] = os.fdatasync if p.datasync else os.fsync
        await trio.to_thread.run_sync(sync, fd)


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
