"""The Linux system calls the passthrough backend needs and the ``os`` module lacks.

``renameat2`` (RENAME_NOREPLACE, RENAME_EXCHANGE), ``utimensat`` with
``UTIME_OMIT`` (change one timestamp and keep the other),
``getdents64`` (directory entries with ext4's own offset cookies, so listings
resume stably), and ``name_to_handle_at``/``open_by_handle_at`` (a file handle
names an inode and its generation, so a reused inode number is ESTALE, never
another file). Each raises ``OSError`` with the errno the kernel returned, like
``os`` does.
"""

from __future__ import annotations

import ctypes
import os
import struct

_libc = ctypes.CDLL(None, use_errno=True)

_SYS_GETDENTS64 = {"x86_64": 217, "aarch64": 61, "riscv64": 61, "ppc64le": 202, "s390x": 220}[os.uname().machine]
UTIME_OMIT = (1 << 30) - 2
AT_SYMLINK_NOFOLLOW = 0x100
AT_EMPTY_PATH = 0x1000
_MAX_HANDLE_SZ = 128
FILEID_INO32_GEN = 1  # ext4's handle: u32 inode number, u32 generation
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


_renameat2 = _libc.renameat2
_renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
_utimensat = _libc.utimensat
_utimensat.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.POINTER(_Timespec), ctypes.c_int]
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long
_name_to_handle_at = _libc.name_to_handle_at
_name_to_handle_at.argtypes = [
    ctypes.c_int,
    ctypes.c_char_p,
    ctypes.c_void_p,
    ctypes.POINTER(ctypes.c_int),
    ctypes.c_int,
]
_open_by_handle_at = _libc.open_by_handle_at
_open_by_handle_at.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int]


def _raise(path: bytes | str | None = None) -> None:
    code = ctypes.get_errno()
    raise OSError(code, os.strerror(code), path)


def renameat2(old_dir_fd: int, old: bytes, new_dir_fd: int, new: bytes, flags: int) -> None:
    if _renameat2(old_dir_fd, old, new_dir_fd, new, flags) != 0:
        _raise(old)


def utimensat(path: bytes, atime_ns: int | None, mtime_ns: int | None) -> None:
    """Set the times of ``path`` (following links); ``None`` leaves a time unchanged."""
    times = (_Timespec * 2)()
    for slot, ns in ((0, atime_ns), (1, mtime_ns)):
        if ns is None:
            times[slot].tv_sec, times[slot].tv_nsec = 0, UTIME_OMIT
        else:
            times[slot].tv_sec, times[slot].tv_nsec = divmod(ns, 1_000_000_000)
    if _utimensat(-100, path, times, 0) != 0:  # AT_FDCWD
        _raise(path)


def name_to_handle_at(dir_fd: int, name: bytes, flags: int) -> bytes:
    """The file handle of ``dir_fd/name`` (not following a final symlink; ``flags``: AT_EMPTY_PATH), as bytes."""
    buf = ctypes.create_string_buffer(8 + _MAX_HANDLE_SZ)
    struct.pack_into("=Ii", buf, 0, _MAX_HANDLE_SZ, 0)
    mount_id = ctypes.c_int()
    if _name_to_handle_at(dir_fd, name, buf, ctypes.byref(mount_id), flags) != 0:
        _raise(name)
    size = struct.unpack_from("=I", buf, 0)[0]
    return buf.raw[: 8 + size]


def open_by_handle_at(mount_fd: int, handle: bytes, flags: int) -> int:
    """Open the inode ``handle`` names on the file system of ``mount_fd``; ESTALE if it is gone."""
    fd: int = _open_by_handle_at(mount_fd, handle, flags)
    if fd < 0:
        _raise()
    return fd


def handle_inode(handle: bytes) -> int | None:
    """The inode number in an ext4 handle, or None for a handle of another kind."""
    if len(handle) >= 16 and struct.unpack_from("=i", handle, 4)[0] == FILEID_INO32_GEN:
        return int(struct.unpack_from("=I", handle, 8)[0])
    return None


_DIRENT_HEAD = struct.Struct("=QqHB")  # d_ino, d_off, d_reclen, d_type; then the name


class DirentReader:
    """Reads raw directory entries from an open directory fd, from a given offset."""

    __slots__ = ("_buf", "_size")

    def __init__(self, size: int = 8192):
        self._size = size
        self._buf = ctypes.create_string_buffer(size)

    def read(self, fd: int, offset: int) -> list[tuple[bytes, int, int]]:
        """Entries ``(name, d_ino, d_off)`` starting at ``offset``; empty at the end."""
        os.lseek(fd, offset, os.SEEK_SET)
        n = _syscall(_SYS_GETDENTS64, fd, self._buf, self._size)
        if n < 0:
            _raise()
        raw = self._buf.raw[:n]
        out = []
        pos = 0
        head = _DIRENT_HEAD
        while pos < n:
            d_ino, d_off, reclen, _type = head.unpack_from(raw, pos)
            end = raw.index(b"\0", pos + 19)
            out.append((raw[pos + 19 : end], d_ino, d_off))
            pos += reclen
        return out
