"""Differential support: run one operation on raw ext4 and through the mount, and compare.

An *operation* is a function ``fn(root: Path)`` that does something under
``root`` and returns a value. :func:`run_both` runs it against ``pair.raw``
(ext4 directly) and ``pair.mnt`` (the same ext4 through fltfuse) and asserts the
two *outcomes* are equal. An outcome is the normalized return value, or
:class:`Failed` (exception type and errno) when the operation raised.

Normalization makes values comparable across the two trees:

* ``os.stat_result`` becomes :class:`Stat`: mode, nlink, uid, gid, size, blocks,
  rdev, and the inode number as an :class:`InoRef` ("the n-th distinct inode of
  this outcome"), so only same-inode relations are compared (hard links share
  one on each side). Times are not part of it: an operation that cares returns
  relations (:func:`changed`, equalities) or times it set itself.
* Paths and strings that contain the side's root have it replaced by ``<root>``.

Operations that need an unprivileged caller call :func:`as_user` inside ``fn``:
it runs a function in a forked child that has dropped to another uid/gid, and
returns its value or re-raises its ``OSError`` in the parent.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import difflib
import errno
import os
import pickle
import pprint
import stat
import struct
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

T = TypeVar("T")

NOBODY = 65534
OTHER = 65533  # a second unprivileged user (needs no passwd entry)


class PairLike(Protocol):
    @property
    def mnt(self) -> Path: ...

    @property
    def raw(self) -> Path: ...


# -- outcomes -----------------------------------------------------------------


@dataclass(frozen=True)
class InoRef:
    """The n-th distinct inode number seen in one outcome."""

    n: int


@dataclass(frozen=True)
class Stat:
    """The stat fields that must match exactly between the mount and ext4."""

    mode: int
    nlink: int
    uid: int
    gid: int
    size: int
    blocks: int
    rdev: int
    ino: InoRef

    def __repr__(self) -> str:
        return (
            f"Stat(mode={self.mode:o}, nlink={self.nlink}, uid={self.uid}, gid={self.gid}, size={self.size}, "
            f"blocks={self.blocks}, rdev={self.rdev:#x}, ino=#{self.ino.n})"
        )


@dataclass(frozen=True)
class Failed:
    """The operation raised: the exception's type and errno (its message names paths, so it is left out)."""

    kind: str
    errno: int | None
    detail: str = ""

    def __repr__(self) -> str:
        code = errno.errorcode.get(self.errno, str(self.errno)) if self.errno is not None else "-"
        return f"Failed({self.kind}, {code}{', ' + self.detail if self.detail else ''})"


def failed(code: int) -> Failed:
    """The outcome of an operation that raised the OSError subclass the kernel maps ``code`` to."""
    return Failed(type(OSError(code, os.strerror(code))).__name__, code)


@dataclass(frozen=True)
class StackTraits:
    """How a filter stack's mount differs from ext4 by design (nothing, for a transparent stack).

    ``blocks_differ``: regular files' st_blocks are not compared (an encryption
    filter stores more bytes than it shows). ``shown_size``: the size the mount
    shows for a regular file whose backing file has the given size.
    ``stores_plaintext``: the backing files hold the bytes the mount shows.
    """

    blocks_differ: bool = False
    shown_size: Callable[[int], int] | None = None
    stores_plaintext: bool = True


TRANSPARENT = StackTraits()
traits = TRANSPARENT  # the stack under test; the conformance tier's fixtures set it per test


class _Normalizer:
    def __init__(self, root: Path):
        self.root = str(root)
        self.inos: dict[int, InoRef] = {}

    def ino(self, value: int) -> InoRef:
        return self.inos.setdefault(value, InoRef(len(self.inos)))

    def __call__(self, value: Any) -> Any:
        if isinstance(value, os.stat_result):
            blocks = -1 if traits.blocks_differ and stat.S_ISREG(value.st_mode) else value.st_blocks
            return Stat(
                value.st_mode,
                value.st_nlink,
                value.st_uid,
                value.st_gid,
                value.st_size,
                blocks,
                value.st_rdev,
                self.ino(value.st_ino),
            )
        if isinstance(value, Path):
            return self(str(value))
        if isinstance(value, str):
            return value.replace(self.root, "<root>")
        if isinstance(value, bytes):
            return value.replace(os.fsencode(self.root), b"<root>")
        if isinstance(value, tuple):
            return tuple(self(v) for v in value)
        if isinstance(value, list):
            return [self(v) for v in value]
        if isinstance(value, dict):
            return {self(k): self(v) for k, v in value.items()}
        if isinstance(value, (set, frozenset)):
            return frozenset(self(v) for v in value)
        return value


def normalize(value: Any, root: Path) -> Any:
    return _Normalizer(root)(value)


def outcome(fn: Callable[[Path], Any], root: Path) -> Any:
    """Run ``fn(root)``: its normalized value, or :class:`Failed` if it raised."""
    try:
        value = fn(root)
    except OSError as exc:
        return Failed(type(exc).__name__, exc.errno)
    except (ValueError, TypeError, OverflowError) as exc:
        return Failed(type(exc).__name__, None, str(exc).replace(str(root), "<root>"))
    return normalize(value, root)


_UNSET: Any = object()


def run_both(pair: PairLike, fn: Callable[[Path], Any], *, expect: Any = _UNSET) -> Any:
    """Run ``fn`` on raw ext4 and through the mount; assert equal outcomes; return the outcome.

    ``expect``, when given, is what ext4 itself must answer (a value, or
    ``failed(errno.EEXIST)``): it keeps a test honest about what it exercises.
    """
    raw = outcome(fn, pair.raw)
    mnt = outcome(fn, pair.mnt)
    if expect is not _UNSET:
        assert raw == expect, f"raw ext4 itself answered {raw!r}, the test expects {expect!r}"
    assert mnt == raw, "the mount differs from ext4:\n" + describe_difference(raw, mnt)
    return raw


def describe_difference(raw: Any, mnt: Any, limit: int = 4000) -> str:
    """The two outcomes, or for long ones only the lines where they differ."""
    a, b = repr(raw), repr(mnt)
    if len(a) + len(b) <= limit:
        return f"  ext4:  {a}\n  mount: {b}"
    lines = difflib.unified_diff(
        pprint.pformat(raw, width=100).splitlines(),
        pprint.pformat(mnt, width=100).splitlines(),
        "ext4",
        "mount",
        lineterm="",
    )
    text = "\n".join(lines)
    return text if len(text) <= limit else text[:limit] + "\n..."


def diverged(run: str, step: int, replay: str, what: str, history: list[str]) -> AssertionError:
    """The error a randomized run raises at its first difference: ``run`` ("random ops"), the step, the
    environment that replays it, what differs, and the last 25 steps of ``history``."""
    recent = "\n".join(f"  {i}: {h}" for i, h in enumerate(history[-25:], start=max(0, len(history) - 25)))
    return AssertionError(f"{run} diverged at step {step} (replay: {replay}):\n{what}\nlast steps:\n{recent}")


# -- time relations -------------------------------------------------------------


def changed(before: int, after: int) -> str:
    """A time relation: "same", "later" or "earlier"."""
    return "same" if after == before else "later" if after > before else "earlier"


def times(st: os.stat_result) -> tuple[int, int, int]:
    return st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns


# -- running as another user ------------------------------------------------------


def as_user(fn: Callable[[Path], T], root: Path, uid: int = NOBODY, gid: int = NOBODY, groups: Iterable[int] = ()) -> T:
    """``fn(Path("."))`` in a forked child with cwd ``root`` and the given ids; its value, or its OSError.

    The child changes directory as root and then drops privileges, so the
    directories above ``root`` (private test directories) need not be
    searchable by ``uid``. It always ends with ``os._exit``.
    """
    group_list = list(groups)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        status = 0
        try:
            os.close(r)
            os.chdir(root)
            os.setgroups(group_list)
            os.setresgid(gid, gid, gid)
            os.setresuid(uid, uid, uid)
            result: tuple[str, Any]
            try:
                result = ("ok", fn(Path(".")))
            except OSError as exc:
                result = ("oserror", (type(exc).__name__, exc.errno))
            except Exception as exc:
                result = ("error", f"{type(exc).__name__}: {exc}")
            try:
                data = pickle.dumps(result)
            except Exception:
                data = pickle.dumps(("error", "unpicklable result: " + traceback.format_exc()))
            view = memoryview(data)
            while view:
                view = view[os.write(w, view) :]
        except BaseException:
            status = 1
            try:
                os.write(w, pickle.dumps(("error", traceback.format_exc())))
            except BaseException:
                pass
        finally:
            os._exit(status)
    os.close(w)
    chunks = []
    with os.fdopen(r, "rb") as f:
        chunks.append(f.read())
    _, wait_status = os.waitpid(pid, 0)
    data = b"".join(chunks)
    if not data:
        raise RuntimeError(f"child for uid {uid} died without an answer (wait status {wait_status:#x})")
    kind, payload = pickle.loads(data)
    if kind == "ok":
        return payload  # type: ignore[no-any-return]
    if kind == "oserror":
        name, code = payload
        raise OSError(code, os.strerror(code) if code is not None else name)
    raise RuntimeError(f"child for uid {uid} failed: {payload}")


# -- system calls the os module lacks ------------------------------------------------

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
_libc.utimensat.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p, ctypes.c_int]
_libc.linkat.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_libc.syscall.restype = ctypes.c_long

AT_FDCWD = -100
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
RENAME_WHITEOUT = 4
UTIME_NOW = (1 << 30) - 1
UTIME_OMIT = (1 << 30) - 2
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
_SYS_GETDENTS64 = {"x86_64": 217, "aarch64": 61, "riscv64": 61, "ppc64le": 202, "s390x": 220}[os.uname().machine]


def _check(ret: int, path: object = None) -> None:
    if ret != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), path)


def renameat2(old: os.PathLike[str] | str, new: os.PathLike[str] | str, flags: int) -> None:
    _check(_libc.renameat2(AT_FDCWD, os.fsencode(old), AT_FDCWD, os.fsencode(new), flags), old)


def utimensat(
    path: os.PathLike[str] | str, atime: tuple[int, int], mtime: tuple[int, int], *, follow: bool = True
) -> None:
    """utimensat(2) with (sec, nsec) pairs; nsec may be UTIME_NOW or UTIME_OMIT."""
    times_arr = (ctypes.c_long * 4)(atime[0], atime[1], mtime[0], mtime[1])
    _check(_libc.utimensat(AT_FDCWD, os.fsencode(path), times_arr, 0 if follow else 0x100), path)


def link_fd(fd: int, new: os.PathLike[str] | str) -> None:
    """linkat(fd, "", AT_FDCWD, new, AT_EMPTY_PATH): give an open (O_TMPFILE) file a name."""
    _check(_libc.linkat(fd, b"", AT_FDCWD, os.fsencode(new), 0x1000), new)


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    _check(_libc.fallocate(fd, mode, offset, length))


def getdents(path: os.PathLike[str] | str, bufsize: int = 4096) -> list[tuple[bytes, int]]:
    """Every (name, d_type) of a directory, ``.`` and ``..`` included, by getdents64."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        return list(dirents(fd, bufsize))
    finally:
        os.close(fd)


def dirents(fd: int, bufsize: int = 4096) -> Iterable[tuple[bytes, int]]:
    """Entries of the open directory ``fd`` from its current offset, one getdents64 buffer at a time."""
    buf = ctypes.create_string_buffer(bufsize)
    while True:
        n = _libc.syscall(_SYS_GETDENTS64, fd, buf, bufsize)
        if n < 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code))
        if n == 0:
            return
        raw = buf.raw[:n]
        pos = 0
        while pos < n:
            _ino, _off, reclen, dtype = struct.unpack_from("=QqHB", raw, pos)
            name = raw[pos + 19 : raw.index(b"\0", pos + 19)]
            yield name, dtype
            pos += reclen


# -- POSIX ACLs as xattr values ------------------------------------------------------

ACL_USER_OBJ, ACL_USER, ACL_GROUP_OBJ, ACL_GROUP, ACL_MASK, ACL_OTHER = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20
_ACL_UNDEFINED_ID = 0xFFFFFFFF


def acl(user: int, group: int, other: int, *, users: dict[int, int] | None = None, mask: int | None = None) -> bytes:
    """The ``system.posix_acl_*`` value for owner/group/other perms, named users and a mask."""
    entries = [(ACL_USER_OBJ, user, _ACL_UNDEFINED_ID)]
    entries += [(ACL_USER, perm, uid) for uid, perm in sorted((users or {}).items())]
    entries.append((ACL_GROUP_OBJ, group, _ACL_UNDEFINED_ID))
    if mask is not None:
        entries.append((ACL_MASK, mask, _ACL_UNDEFINED_ID))
    entries.append((ACL_OTHER, other, _ACL_UNDEFINED_ID))
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries)
