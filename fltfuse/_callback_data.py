"""The callback data: one object per request, from the kernel adapter to the backend and back.

Where it sits: stage (2) of the data flow. The kernel adapter (``fltfuse._kernel``)
builds one :class:`CallbackData` for each FUSE request, the instance stack passes
it down the pre-operation callbacks to the backend and back up the post-operation
callbacks, and the adapter answers the kernel from ``io_status`` and the output
fields of the parameters.

Windows counterpart: ``FLT_CALLBACK_DATA`` with its ``FLT_IO_PARAMETER_BLOCK``
(``Iopb``), ``IO_STATUS_BLOCK`` (``IoStatus``) and the ``Parameters`` union. In
Python the union is one small class per kind of request (``ReadParameters``,
``CreateParameters`` ...); each names its major function, and the fields a
callback may read and change. Output fields (``data``, ``attributes`` ...) are
``None`` in a pre-operation and filled by the backend for the post-operation,
like the buffer of an IRP.

Linux truths a filter author must know:

* A file and its one data stream are the inode (``FileObject.inode``); a stream
  handle is the FUSE file handle (``FileObject.handle``).
* The kernel sends no context (pid/uid/gid) with READ, WRITE, CLEANUP, CLOSE,
  FLUSH_BUFFERS and DIRECTORY_CONTROL; for those the requestor is the process
  that opened the handle.
"""

from __future__ import annotations

import enum
import os
import stat as _stat
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ._status import NtStatus


class MajorFunction(enum.IntEnum):
    """IRP major function codes, FltMgr pseudo-operations and fltfuse's FUSE-only majors.

    ``FUSE_PRODUCES`` lists the ones a FUSE request can ever produce; the rest
    exist so that code and tables written against Windows' names still read
    right (see the README's glossary).
    """

    CREATE = 0x00
    CREATE_NAMED_PIPE = 0x01
    CLOSE = 0x02
    READ = 0x03
    WRITE = 0x04
    QUERY_INFORMATION = 0x05
    SET_INFORMATION = 0x06
    QUERY_EA = 0x07
    SET_EA = 0x08
    FLUSH_BUFFERS = 0x09
    QUERY_VOLUME_INFORMATION = 0x0A
    SET_VOLUME_INFORMATION = 0x0B
    DIRECTORY_CONTROL = 0x0C
    FILE_SYSTEM_CONTROL = 0x0D
    DEVICE_CONTROL = 0x0E
    INTERNAL_DEVICE_CONTROL = 0x0F
    SHUTDOWN = 0x10
    LOCK_CONTROL = 0x11
    CLEANUP = 0x12
    CREATE_MAILSLOT = 0x13
    QUERY_SECURITY = 0x14
    SET_SECURITY = 0x15
    POWER = 0x16
    SYSTEM_CONTROL = 0x17
    DEVICE_CHANGE = 0x18
    QUERY_QUOTA = 0x19
    SET_QUOTA = 0x1A
    PNP = 0x1B
    # FltMgr pseudo-operations (negative UCHAR codes in fltKernel.h).
    ACQUIRE_FOR_SECTION_SYNCHRONIZATION = -1
    RELEASE_FOR_SECTION_SYNCHRONIZATION = -2
    ACQUIRE_FOR_MOD_WRITE = -3
    RELEASE_FOR_MOD_WRITE = -4
    ACQUIRE_FOR_CC_FLUSH = -5
    RELEASE_FOR_CC_FLUSH = -6
    QUERY_OPEN = -7
    FAST_IO_CHECK_IF_POSSIBLE = -13
    NETWORK_QUERY_OPEN = -14
    MDL_READ = -15
    MDL_READ_COMPLETE = -16
    PREPARE_MDL_WRITE = -17
    MDL_WRITE_COMPLETE = -18
    VOLUME_MOUNT = -19
    VOLUME_DISMOUNT = -20
    # FUSE requests with no Windows twin: named for what they are.
    LOOKUP = 0x40
    FORGET = 0x41
    ACCESS = 0x42


FUSE_PRODUCES = frozenset(
    {
        MajorFunction.CREATE,
        MajorFunction.CLOSE,
        MajorFunction.READ,
        MajorFunction.WRITE,
        MajorFunction.QUERY_INFORMATION,
        MajorFunction.SET_INFORMATION,
        MajorFunction.QUERY_EA,
        MajorFunction.SET_EA,
        MajorFunction.FLUSH_BUFFERS,
        MajorFunction.QUERY_VOLUME_INFORMATION,
        MajorFunction.DIRECTORY_CONTROL,
        MajorFunction.FILE_SYSTEM_CONTROL,
        MajorFunction.CLEANUP,
        MajorFunction.LOOKUP,
        MajorFunction.FORGET,
        MajorFunction.ACCESS,
    }
)


class FileInformationClass(enum.IntEnum):
    """Minor code of QUERY_INFORMATION and SET_INFORMATION (FILE_INFORMATION_CLASS)."""

    BASIC = 4  # times, and on Linux mode/uid/gid (chmod, chown, utimensat)
    STANDARD = 5
    LINK = 11  # link(2)
    DISPOSITION = 13  # unlink(2), rmdir(2)
    ALL = 18  # stat(2): every attribute
    END_OF_FILE = 20  # truncate(2), ftruncate(2), O_TRUNC
    RENAME_EX = 65  # rename(2)/renameat2(2) with RENAME_NOREPLACE / RENAME_EXCHANGE flags


class DirectoryMinor(enum.IntEnum):
    """Minor code of DIRECTORY_CONTROL."""

    QUERY_DIRECTORY = 1
    NOTIFY_CHANGE_DIRECTORY = 2  # no FUSE request produces it (inotify is local)


class FsControlCode(enum.IntEnum):
    """FSCTL code of FILE_SYSTEM_CONTROL requests."""

    GET_REPARSE_POINT = 0x000900A8  # readlink(2)


class EaMinor(enum.IntEnum):
    """Minor code of QUERY_EA and SET_EA: which xattr call produced the request."""

    GET = 1
    LIST = 2
    SET = 3
    REMOVE = 4


class CreateDisposition(enum.IntEnum):
    """What CREATE does when the name exists or not (FILE_SUPERSEDE ... FILE_OVERWRITE_IF)."""

    OPEN = 1  # open(2) of an existing file or directory
    CREATE = 2  # O_CREAT|O_EXCL, mkdir, mknod, symlink: fails if the name exists
    OPEN_IF = 3  # O_CREAT: the kernel sends it only when the name does not exist yet
    OVERWRITE = 4  # open(2) of an existing file with O_TRUNC (the kernel negotiates atomic_o_trunc)
    OVERWRITE_IF = 5  # O_CREAT|O_TRUNC

    @classmethod
    def for_open(cls, flags: int, exists: bool) -> CreateDisposition:
        """The disposition open(2) ``flags`` ask for: of an existing file (OPEN or OVERWRITE with
        O_TRUNC), or of a name that does not exist yet with O_CREAT (CREATE with O_EXCL,
        OVERWRITE_IF with O_TRUNC, else OPEN_IF)."""
        if exists:
            return cls.OVERWRITE if flags & os.O_TRUNC else cls.OPEN
        if flags & os.O_EXCL:
            return cls.CREATE
        return cls.OVERWRITE_IF if flags & os.O_TRUNC else cls.OPEN_IF


# CLEANUP and CLOSE cannot fail (the caller's close(2) has already succeeded):
# a filter's attempt is a bug, and the request goes on.
CANNOT_FAIL = frozenset({MajorFunction.CLEANUP, MajorFunction.CLOSE})


class FileType(enum.IntEnum):
    """The kind of object a CREATE makes or opens (from st_mode)."""

    REGULAR = _stat.S_IFREG
    DIRECTORY = _stat.S_IFDIR
    SYMLINK = _stat.S_IFLNK
    FIFO = _stat.S_IFIFO
    CHARACTER_DEVICE = _stat.S_IFCHR
    BLOCK_DEVICE = _stat.S_IFBLK
    SOCKET = _stat.S_IFSOCK


class CallbackDataFlags(enum.IntFlag):
    """FLTFL_CALLBACK_DATA_*: what kind of operation this is."""

    IRP_OPERATION = 0x00000001
    FAST_IO_OPERATION = 0x00000002
    FS_FILTER_OPERATION = 0x00000004
    SYSTEM_BUFFER = 0x00000008
    GENERATED_IO = 0x00010000
    REISSUED_IO = 0x00020000
    DRAINING = 0x00040000
    POST_OPERATION = 0x00080000
    NEW_SYSTEM_BUFFER = 0x00100000
    TOP_OF_STACK_IO = 0x01000000  # fltfuse: filter-initiated I/O sent to the top of the stack
    DIRTY = 0x80000000


_DIRTY = int(CallbackDataFlags.DIRTY)


@dataclass(slots=True)
class FileAttributes:
    """What stat(2) says of a file; the reply to LOOKUP, QUERY_INFORMATION and CREATE.

    ``ino`` is the file id the kernel sees. It is the ext4 inode number, except
    for the volume root, which FUSE always calls 1.
    """

    ino: int
    mode: int
    nlink: int
    uid: int
    gid: int
    rdev: int
    size: int
    blksize: int
    blocks: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def from_stat(cls, st: os.stat_result, ino: int) -> FileAttributes:
        return cls(
            ino,
            st.st_mode,
            st.st_nlink,
            st.st_uid,
            st.st_gid,
            st.st_rdev,
            st.st_size,
            st.st_blksize,
            st.st_blocks,
            st.st_atime_ns,
            st.st_mtime_ns,
            st.st_ctime_ns,
        )


@dataclass(slots=True)
class VolumeStatistics:
    """statvfs(2) of the backing file system: the reply to QUERY_VOLUME_INFORMATION."""

    block_size: int
    fragment_size: int
    blocks: int
    blocks_free: int
    blocks_available: int
    files: int
    files_free: int
    files_available: int
    name_max: int


@dataclass(slots=True)
class DirectoryEntry:
    """One entry of a directory listing, with the offset of the entry after it.

    ``next_offset`` is the backend's own cookie (ext4's directory hash), so a
    listing resumed at that offset neither skips nor repeats entries while the
    directory changes.
    """

    name: bytes
    attributes: FileAttributes
    next_offset: int


@dataclass(slots=True)
class Requestor:
    """Who asked: the calling process and the ids the kernel checks permissions with."""

    pid: int
    uid: int
    gid: int
    umask: int


class FileObject:
    """The target of a request: a file (inode) and, once opened, its handle.

    Windows counterpart: ``FILE_OBJECT``. One FileObject lives from the CREATE
    that opens a handle to the CLOSE that releases it; requests that name a
    file without a handle (stat, chmod by path) get a transient FileObject with
    ``handle = None``.
    """

    __slots__ = ("closed", "creating", "flags", "handle", "initiator", "inode", "link", "opener", "uncached")

    def __init__(self, inode: int, handle: int | None = None, flags: int = 0, opener: Requestor | None = None):
        self.inode = inode
        self.handle = handle
        self.flags = flags  # open(2) flags of the handle
        self.opener = opener
        # the kernel's page cache is not used for this handle (O_DIRECT, or an instance
        # registered READ/WRITE with BYPASS_KERNEL_CACHE): each read(2)/write(2) is a request
        self.uncached = bool(flags & os.O_DIRECT)
        self.creating = False  # in a CREATE until the object is made or opened (no file contexts yet)
        self.closed = False  # its handle is released (CLOSE went down): no context may be set on it
        # (directory node id, name) the caller opened it through, if known: its opened name
        self.link: tuple[int, bytes] | None = None
        # the instance that opened it with filter-initiated I/O: its requests go only below that instance
        self.initiator: Any = None

    def __repr__(self) -> str:
        return f"FileObject(inode={self.inode}, handle={self.handle})"


# ---------------------------------------------------------------------------
# Parameters: one class per kind of request. Each names its major function.


class Parameters:
    """Base of the per-request parameter classes (the ``Parameters`` union).

    ``MAJOR`` is the major function; ``OUTPUTS`` names the fields the file
    system fills (the filter manager carries them back up to each instance's
    own copy of the parameters).
    """

    __slots__ = ()
    MAJOR: ClassVar[MajorFunction]
    OUTPUTS: ClassVar[tuple[str, ...]]

    def copy(self) -> Parameters:
        """A shallow copy (what an instance may change before passing the request down).

        The first call on a class replaces this method with a copier generated
        for the class's fields, so later calls are one plain function call.
        """
        cls = type(self)
        copier = _make_copier(cls)
        cls.copy = copier  # type: ignore[method-assign,assignment]
        return copier(self)


def _make_copier(cls: type[Parameters]) -> Callable[[Parameters], Parameters]:
    """A function that copies one parameters class field by field (the walk copies once per pre)."""
    slots: tuple[str, ...] = cls.__slots__
    lines = [f"    new.{name} = old.{name}" for name in slots]
    source = "def copy(old):\n    new = new_object(cls)\n" + "\n".join(lines) + "\n    return new\n"
    namespace: dict[str, Any] = {"new_object": object.__new__, "cls": cls}
    exec(source, namespace)
    copier: Callable[[Parameters], Parameters] = namespace["copy"]
    return copier


@dataclass(slots=True)
class LookupParameters(Parameters):
    """LOOKUP: resolve ``name`` in directory ``parent`` (a path walk step)."""

    MAJOR: ClassVar[MajorFunction] = MajorFunction.LOOKUP
    OUTPUTS: ClassVar[tuple[str, ...]] = ("attributes",)
    parent: int
    name: bytes
    attributes: FileAttributes | None = None  # out


@dataclass(slots=True)
class CreateParameters(Parameters):
    """CREATE: open(2), creat(2), mkdir(2), mknod(2), symlink(2), opendir(3).

    For ``disposition`` OPEN and OVERWRITE the target is ``FileObject.inode`` and
    ``parent``/``name`` are unset; otherwise the object ``name`` is made in ``parent``
    (and ``FileObject.inode`` is the parent). Once the file system has made or
    opened the object, in the post-operation callbacks, ``FileObject.inode`` is
    the object and ``FileObject.handle`` its handle (None if none was requested).
    """

    MAJOR: ClassVar[MajorFunction] = MajorFunction.CREATE
    OUTPUTS: ClassVar[tuple[str, ...]] = ("attributes", "handle")
    disposition: CreateDisposition
    file_type: FileType
    flags: int  # open(2) flags (O_ACCMODE, O_APPEND, O_DIRECT ...)
    parent: int = 0
    name: bytes = b""
    mode: int = 0  # permission bits for a new object
    rdev: int = 0  # device number for mknod of a device
    link_target: bytes = b""  # target of a new symlink
    handle_requested: bool = False  # open(2)/creat(2)/opendir: leave a handle open; mkdir/mknod/symlink: don't
    attributes: FileAttributes | None = None  # out: the new object; for an open, set if opening changed it (atime)
    handle: int | None = None  # out: for regular files and directories opened, the handle


@dataclass(slots=True)
class ReadParameters(Parameters):
    """READ: read ``length`` bytes at ``offset`` of the handle."""

    MAJOR: ClassVar[MajorFunction] = MajorFunction.READ
    OUTPUTS: ClassVar[tuple[str, ...]] = ("data",)
    offset: int
    length: int
    data: bytes | bytearray | memoryview | None = None  # out: at most ``length`` bytes; short at EOF


@dataclass(slots=True)
class WriteParameters(Parameters):
    """WRITE: write ``data`` at ``offset``; ``io_status.information`` is the count written."""

    MAJOR: ClassVar[MajorFunction] = MajorFunction.WRITE
    OUTPUTS: ClassVar[tuple[str, ...]] = ()
    offset: int
    data: bytes | bytearray | memoryview


@dataclass(slots=True)
class QueryInformationParameters(Parameters):
    """QUERY_INFORMATION: stat(2)/fstat(2)."""

    MAJOR: ClassVar[MajorFunction] = MajorFunction.QUERY_INFORMATION
    OUTPUTS: ClassVar[tuple[str, ...]] = ("attributes",)
    information_class: FileInformationClass = FileInformationClass.ALL
    attributes: FileAttributes | None = None  # out


@dataclass(slots=True)
class SetAttributesParameters(Parameters):
    """SET_INFORMATION (BASIC or END_OF_FILE): chmod, chown, truncate, utimensat.

    Only the fields that are not ``None`` change. A time set to "now"
    (utimensat's UTIME_NOW) arrives as pyfuse3's reading of the clock: pyfuse3
    does not say which it was. ``touch_change_time`` alone is a
    chown(f, -1, -1): only the change time moves.
    """

    MAJOR: ClassVar[MajorFunction] = MajorFunction.SET_INFORMATION
    OUTPUTS: ClassVar[tuple[str, ...]] = ("attributes",)
    information_class: FileInformationClass
    size: int | None = None
    mode: int | None = None
    uid: int | None = None
    gid: int | None = None
    atime_ns: int | None = None
    mtime_ns: int | None = None
    touch_change_time: bool = False
    attributes: FileAttributes | None = None  # out: after the change


@dataclass(slots=True)
class RenameParameters(Parameters):
    """SET_INFORMATION (RENAME_EX): rename ``parent/name`` to ``new_parent/new_name``.

    ``flags`` is 0, ``RENAME_NOREPLACE`` (1) or ``RENAME_EXCHANGE`` (2).
    """

    MAJOR: ClassVar[MajorFunction] = MajorFunction.SET_INFORMATION
    OUTPUTS: ClassVar[tuple[str, ...]] = ()
    parent: int
    name: bytes
    new_parent: int
    new_name: bytes
    flags: int = 0
    information_class: FileInformationClass = FileInformationClass.RENAME_EX


@dataclass(slots=True)
class LinkParameters(Parameters):
    """SET_INFORMATION (LINK): give the target file another name ``new_parent/new_name``."""

    MAJOR: ClassVar[MajorFunction] = MajorFunction.SET_INFORMATION
    OUTPUTS: ClassVar[tuple[str, ...]] = ("attributes",)
    new_parent: int
    new_name: bytes
    information_class: FileInformationClass = FileInformationClass.LINK
    attributes: FileAttributes | None = None  # out


@dataclass(slots=True)
class DispositionParameters(Parameters):
    """SET_INFORMATION (DISPOSITION): unlink(2) (``directory`` false) or rmdir(2)."""

    MAJOR: ClassVar[MajorFunction] = MajorFunction.SET_INFORMATION
    OUTPUTS: ClassVar[tuple[str, ...]] = ()
    parent: int
    name: bytes
    directory: bool
    information_class: FileInformationClass = FileInformationClass.DISPOSITION


@dataclass(slots=True)
class FileSystemControlParameters(Parameters):
    """FILE_SYSTEM_CONTROL: readlink(2) is FSCTL_GET_REPARSE_POINT."""

    MAJOR: ClassVar[MajorFunction] = MajorFunction.FILE_SYSTEM_CONTROL
    OUTPUTS: ClassVar[tuple[str, ...]] = ("target",)
    control_code: FsControlCode = FsControlCode.GET_REPARSE_POINT
    target: bytes | None = None  # out: the symlink's target


@dataclass(slots=True)
class DirectoryControlParameters(Parameters):
    """DIRECTORY_CONTROL (QUERY_DIRECTORY): list the open directory from ``offset``.

    The backend returns a batch of entries in ``entries``; the kernel adapter
    passes on as many as the kernel's buffer takes and asks again from the last
    one's ``next_offset``. Offset 0 starts over. ``.`` and ``..`` are listed.
    """

    MAJOR: ClassVar[MajorFunction] = MajorFunction.DIRECTORY_CONTROL
    OUTPUTS: ClassVar[tuple[str, ...]] = ("entries",)
    offset: int
    minor: DirectoryMinor = DirectoryMinor.QUERY_DIRECTORY
    entries: list[DirectoryEntry] = field(default_factory=list)  # out


@dataclass(slots=True)
class QueryEaParameters(Parameters):
    """QUERY_EA: getxattr(2) of ``name`` (minor GET) or listxattr(2) (minor LIST)."""

    MAJOR: ClassVar[MajorFunction] = MajorFunction.QUERY_EA
    OUTPUTS: ClassVar[tuple[str, ...]] = ("value", "names")
    minor: EaMinor
    name: bytes = b""
    value: bytes | None = None  # out (GET)
    names: list[bytes] | None = None  # out (LIST)


@dataclass(slots=True)
class SetEaParameters(Parameters):
    """SET_EA: setxattr(2) of ``name`` to ``value`` (minor SET) or removexattr(2) (minor REMOVE)."""

    MAJOR: ClassVar[MajorFunction] = MajorFunction.SET_EA
    OUTPUTS: ClassVar[tuple[str, ...]] = ()
    minor: EaMinor
    name: bytes
    value: bytes = b""


@dataclass(slots=True)
class FlushBuffersParameters(Parameters):
    """FLUSH_BUFFERS: fsync(2)/fdatasync(2) of a file or directory handle."""

    MAJOR: ClassVar[MajorFunction] = MajorFunction.FLUSH_BUFFERS
    OUTPUTS: ClassVar[tuple[str, ...]] = ()
    datasync: bool
    directory: bool = False


@dataclass(slots=True)
class CleanupParameters(Parameters):
    """CLEANUP: a close(2) of a descriptor of the handle (FUSE FLUSH). Cannot fail."""

    MAJOR: ClassVar[MajorFunction] = MajorFunction.CLEANUP
    OUTPUTS: ClassVar[tuple[str, ...]] = ()


@dataclass(slots=True)
class CloseParameters(Parameters):
    """CLOSE: the handle is gone (FUSE RELEASE / RELEASEDIR). Cannot fail."""

    MAJOR: ClassVar[MajorFunction] = MajorFunction.CLOSE
    OUTPUTS: ClassVar[tuple[str, ...]] = ()
    directory: bool = False


@dataclass(slots=True)
class QueryVolumeInformationParameters(Parameters):
    """QUERY_VOLUME_INFORMATION: statfs(2)."""

    MAJOR: ClassVar[MajorFunction] = MajorFunction.QUERY_VOLUME_INFORMATION
    OUTPUTS: ClassVar[tuple[str, ...]] = ("statistics",)
    statistics: VolumeStatistics | None = None  # out


@dataclass(slots=True)
class AccessParameters(Parameters):
    """ACCESS: access(2) with ``mode`` (R_OK|W_OK|X_OK or F_OK).

    Only sent when the volume is mounted without ``default_permissions``.
    """

    MAJOR: ClassVar[MajorFunction] = MajorFunction.ACCESS
    OUTPUTS: ClassVar[tuple[str, ...]] = ()
    mode: int


# ---------------------------------------------------------------------------


class IoStatus:
    """IO_STATUS_BLOCK: the final status and the information (a byte count, a create result)."""

    __slots__ = ("information", "status")

    def __init__(self) -> None:
        self.status: NtStatus = NtStatus.SUCCESS
        self.information: int = 0

    def __repr__(self) -> str:
        return f"IoStatus({self.status.name}, {self.information})"


class IoParameterBlock:
    """FLT_IO_PARAMETER_BLOCK: what is asked of the file system."""

    __slots__ = ("parameters", "target_file_object")

    def __init__(self, target_file_object: FileObject, parameters: Parameters):
        self.target_file_object = target_file_object
        self.parameters = parameters

    @property
    def major_function(self) -> MajorFunction:
        return self.parameters.MAJOR


class CallbackData:
    """FLT_CALLBACK_DATA: one request on its way down the stack and back up.

    ``requestor`` is the calling process; ``io_status`` is the outcome. A filter
    that changes ``iopb.parameters`` must call :meth:`set_dirty` (the filter
    manager passes changed parameters down only when dirty); ``io_status``
    changes need no flag.
    """

    __slots__ = ("flags", "initiator", "io_status", "iopb", "pended", "requestor")

    def __init__(
        self,
        target_file_object: FileObject,
        parameters: Parameters,
        requestor: Requestor,
        flags: int = CallbackDataFlags.IRP_OPERATION,
    ):
        self.iopb = IoParameterBlock(target_file_object, parameters)
        self.io_status = IoStatus()
        self.requestor = requestor
        self.flags = int(flags)  # CallbackDataFlags bits, kept as a plain int (IntFlag arithmetic is slow)
        self.pended: Any = None  # the filter manager's record of a pended pre- or post-operation
        self.initiator: Any = None  # the instance that generated it (filter-initiated I/O), else None

    def set_dirty(self) -> None:
        """FltSetCallbackDataDirty: the parameters were changed by this filter."""
        self.flags |= _DIRTY

    def clear_dirty(self) -> None:
        """FltClearCallbackDataDirty."""
        self.flags &= ~_DIRTY

    @property
    def is_dirty(self) -> bool:
        """FltIsCallbackDataDirty."""
        return bool(self.flags & _DIRTY)

    def __repr__(self) -> str:
        return (
            f"CallbackData({self.iopb.major_function.name}, {self.iopb.target_file_object!r}, "
            f"{self.iopb.parameters!r}, {self.io_status!r}, pid={self.requestor.pid})"
        )
