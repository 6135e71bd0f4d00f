"""NTSTATUS values and the one table that maps them to and from errno.

Where it sits: every request ends with ``CallbackData.io_status.status``; the
kernel adapter turns that status into the FUSE reply, and the backend turns an
``OSError`` from ext4 into a status. Both directions go through the single
table below, so an errno from ext4 comes out of the mount unchanged.

Windows counterpart: NTSTATUS (``ntstatus.h``) and the ``STATUS_*`` constants a
minifilter sets in ``Data->IoStatus.Status``.

Contract of the mapping:

* ``status_from_errno(e)`` is defined for every errno and
  ``errno_from_status(status_from_errno(e)) == e`` (lossless).
* Statuses that have a natural Windows name use it (``OBJECT_NAME_NOT_FOUND``
  for ``ENOENT``). Errnos without one get a *customer* status
  (``0xE0EE0000 | errno``; bit 29 is the NTSTATUS customer bit), so nothing is
  ever folded into a generic error.
* A status that is neither success nor mapped (for example ``UNSUCCESSFUL``
  set by a filter) answers ``EIO``.
"""

from __future__ import annotations

import enum
import errno as _errno

_CUSTOMER_ERRNO_BASE = 0xE0EE0000
_CUSTOMER_ERRNO_MASK = 0xFFFF0000


class NtStatus(enum.IntEnum):
    """A status code. Success codes are < 0x80000000; errors have bit 31 set."""

    SUCCESS = 0x00000000
    PENDING = 0x00000103
    REPARSE = 0x00000104
    MORE_ENTRIES = 0x00000105
    BUFFER_OVERFLOW = 0x80000005
    NO_MORE_FILES = 0x80000006
    UNSUCCESSFUL = 0xC0000001
    NOT_IMPLEMENTED = 0xC0000002
    INVALID_HANDLE = 0xC0000008
    INVALID_PARAMETER = 0xC000000D
    NO_SUCH_DEVICE = 0xC000000E
    END_OF_FILE = 0xC0000011
    NO_MEMORY = 0xC0000017
    ACCESS_DENIED = 0xC0000022
    BUFFER_TOO_SMALL = 0xC0000023
    OBJECT_NAME_INVALID = 0xC0000033
    OBJECT_NAME_NOT_FOUND = 0xC0000034
    OBJECT_NAME_COLLISION = 0xC0000035
    OBJECT_PATH_NOT_FOUND = 0xC000003A
    SHARING_VIOLATION = 0xC0000043
    EA_TOO_LARGE = 0xC0000050
    NONEXISTENT_EA_ENTRY = 0xC0000051
    DELETE_PENDING = 0xC0000056
    PRIVILEGE_NOT_HELD = 0xC0000061
    DISK_FULL = 0xC000007F
    TOO_MANY_OPENED_FILES = 0xC000011F
    INSUFFICIENT_RESOURCES = 0xC000009A
    MEDIA_WRITE_PROTECTED = 0xC00000A2
    DEVICE_BUSY = 0x80000011
    NOT_SUPPORTED = 0xC00000BB
    NOT_SAME_DEVICE = 0xC00000D4
    FILE_IS_A_DIRECTORY = 0xC00000BA
    IO_DEVICE_ERROR = 0xC0000185
    CRC_ERROR = 0xC000003F  # data failed its integrity check (EIO)
    DIRECTORY_NOT_EMPTY = 0xC0000101
    NOT_A_DIRECTORY = 0xC0000103
    NAME_TOO_LONG = 0xC0000106
    CANCELLED = 0xC0000120
    FILE_DELETED = 0xC0000123
    POSSIBLE_DEADLOCK = 0xC0000194
    FILE_INVALID = 0xC0000098
    TOO_MANY_LINKS = 0xC0000265
    FILE_TOO_LARGE = 0xC0000904
    STOPPED_ON_SYMLINK = 0x8000002D
    QUOTA_EXCEEDED = 0xC0000044
    INVALID_DEVICE_REQUEST = 0xC0000010
    RANGE_NOT_LOCKED = 0xC000007E
    TIMEOUT = 0x00000102
    IO_TIMEOUT = 0xC00000B5
    # Filter Manager statuses (ntstatus.h, facility 0x1C).
    FLT_CONTEXT_ALREADY_DEFINED = 0xC01C0002
    FLT_DISALLOW_FAST_IO = 0xC01C0004
    FLT_NOT_INITIALIZED = 0xC01C0007
    FLT_FILTER_NOT_READY = 0xC01C0008
    FLT_INTERNAL_ERROR = 0xC01C000A
    FLT_DELETING_OBJECT = 0xC01C000B
    FLT_DO_NOT_ATTACH = 0xC01C000F
    FLT_DO_NOT_DETACH = 0xC01C0010
    FLT_INSTANCE_ALTITUDE_COLLISION = 0xC01C0011
    FLT_INSTANCE_NAME_COLLISION = 0xC01C0012
    FLT_FILTER_NOT_FOUND = 0xC01C0013
    FLT_VOLUME_NOT_FOUND = 0xC01C0014
    FLT_INSTANCE_NOT_FOUND = 0xC01C0015
    FLT_INVALID_CONTEXT_REGISTRATION = 0xC01C0017
    FLT_NAME_CACHE_MISS = 0xC01C0018
    FLT_CONTEXT_ALREADY_LINKED = 0xC01C0028
    FLT_NO_WAITER_FOR_REPLY = 0xC01C0020
    PORT_DISCONNECTED = 0xC0000037
    CONNECTION_REFUSED = 0xC0000236
    CONNECTION_COUNT_LIMIT = 0xC0000246

    @classmethod
    def _missing_(cls, value: object) -> NtStatus | None:
        if isinstance(value, int) and value & _CUSTOMER_ERRNO_MASK == _CUSTOMER_ERRNO_BASE:
            code = value & 0xFFFF
            member = int.__new__(cls, value)
            member._name_ = "ERRNO_" + _errno.errorcode.get(code, str(code))
            member._value_ = value
            return member
        return None

    @property
    def is_error(self) -> bool:
        """True for error statuses (NT_ERROR: severity bits 11)."""
        return self >= 0xC0000000

    @property
    def is_success(self) -> bool:
        """True for success and informational statuses (NT_SUCCESS)."""
        return self < 0x80000000


# The one table. Each errno appears once; each status at most once.
_ERRNO_TO_STATUS: dict[int, NtStatus] = {
    0: NtStatus.SUCCESS,
    _errno.EPERM: NtStatus.PRIVILEGE_NOT_HELD,
    _errno.ENOENT: NtStatus.OBJECT_NAME_NOT_FOUND,
    _errno.EIO: NtStatus.IO_DEVICE_ERROR,
    _errno.ENXIO: NtStatus.NO_SUCH_DEVICE,
    _errno.EBADF: NtStatus.INVALID_HANDLE,
    _errno.ENOMEM: NtStatus.NO_MEMORY,
    _errno.EACCES: NtStatus.ACCESS_DENIED,
    _errno.EBUSY: NtStatus.DEVICE_BUSY,
    _errno.EEXIST: NtStatus.OBJECT_NAME_COLLISION,
    _errno.EXDEV: NtStatus.NOT_SAME_DEVICE,
    _errno.ENOTDIR: NtStatus.NOT_A_DIRECTORY,
    _errno.EISDIR: NtStatus.FILE_IS_A_DIRECTORY,
    _errno.EINVAL: NtStatus.INVALID_PARAMETER,
    _errno.EMFILE: NtStatus.TOO_MANY_OPENED_FILES,
    _errno.ETXTBSY: NtStatus.SHARING_VIOLATION,
    _errno.EFBIG: NtStatus.FILE_TOO_LARGE,
    _errno.ENOSPC: NtStatus.DISK_FULL,
    _errno.EROFS: NtStatus.MEDIA_WRITE_PROTECTED,
    _errno.EMLINK: NtStatus.TOO_MANY_LINKS,
    _errno.ERANGE: NtStatus.BUFFER_TOO_SMALL,
    _errno.E2BIG: NtStatus.EA_TOO_LARGE,
    _errno.ENAMETOOLONG: NtStatus.NAME_TOO_LONG,
    _errno.ENOSYS: NtStatus.NOT_IMPLEMENTED,
    _errno.ENOTEMPTY: NtStatus.DIRECTORY_NOT_EMPTY,
    _errno.ELOOP: NtStatus.STOPPED_ON_SYMLINK,
    _errno.ENODATA: NtStatus.NONEXISTENT_EA_ENTRY,
    _errno.EOPNOTSUPP: NtStatus.NOT_SUPPORTED,
    _errno.EINTR: NtStatus.CANCELLED,
    _errno.EDQUOT: NtStatus.QUOTA_EXCEEDED,
    _errno.ESTALE: NtStatus.FILE_INVALID,
    _errno.ENOTTY: NtStatus.INVALID_DEVICE_REQUEST,
    _errno.ETIMEDOUT: NtStatus.IO_TIMEOUT,
    _errno.ECONNRESET: NtStatus.PORT_DISCONNECTED,
    _errno.ECONNREFUSED: NtStatus.CONNECTION_REFUSED,
    _errno.ENOLCK: NtStatus.RANGE_NOT_LOCKED,
    _errno.EDEADLK: NtStatus.POSSIBLE_DEADLOCK,
}
_STATUS_TO_ERRNO: dict[int, int] = {status: code for code, status in _ERRNO_TO_STATUS.items()}
assert len(_STATUS_TO_ERRNO) == len(_ERRNO_TO_STATUS), "status table is not one-to-one"


def status_from_errno(code: int) -> NtStatus:
    """The status a filter sees for an errno returned by the file system."""
    status = _ERRNO_TO_STATUS.get(code)
    if status is None:
        status = NtStatus(_CUSTOMER_ERRNO_BASE | (code & 0xFFFF))
    return status


def errno_from_status(status: int) -> int:
    """The errno the caller gets for a final status (0 for success statuses)."""
    code = _STATUS_TO_ERRNO.get(status)
    if code is not None:
        return code
    if status & _CUSTOMER_ERRNO_MASK == _CUSTOMER_ERRNO_BASE:
        return status & 0xFFFF
    if status < 0x80000000:
        return 0
    return _errno.EIO
