"""Concurrent stress on a real mount (fsstress-like) and long single-file histories (fsx-like).

``test_concurrent_stress`` mounts a fresh small volume per stack and starts
``FLTFUSE_STRESS_WORKERS`` forked workers at once. Each runs
``FLTFUSE_STRESS_OPS`` random operations, each one either

* in its **private** directory, which no one else touches: the worker keeps an
  exact model of that tree (names, types, modes, link counts, contents, xattrs,
  its open descriptors and their offsets), predicts every operation's outcome
  (value or errno) and checks it, and checks the whole tree against the model
  every ``VERIFY_EVERY`` operations and at the end; or
* in the **shared** directory, where all workers race on the same names with
  creates (some O_EXCL), writes, appends, truncates, renames (plain, NOREPLACE,
  EXCHANGE), links, unlinks, mkdir/rmdir, symlinks, xattrs, chmod, fsync,
  reads, stats, descriptors kept open while others rename or unlink their
  names, and listings of directories others are changing. Only the errnos a
  race explains are allowed (ENOENT, EEXIST, ENOTEMPTY, ENOTDIR, EISDIR, and
  per operation the one its arguments explain: EINVAL for a rename into the
  source's own subtree or a readlink of a non-symlink, EPERM for a link to a
  directory, ENODATA for a missing xattr); EIO and ESTALE never are. A
  descriptor that opened never fails. A listing never shows a name twice nor
  a name no one made; or
* on its **stripe** of one shared file: the workers' stripes are not page
  aligned, so neighbours write the same pages at once, by pwrite and through
  MAP_SHARED mappings (with and without msync); each checks its own stripe
  exactly.

Afterwards the daemon must be alive and have logged no error and no filter
bug; the tree seen through the mount must equal the tree on the backing ext4
(names, types, modes, sizes, link counts and hard-link groups, contents,
symlink targets, xattrs, and every attribute the mount reports); each private
directory on ext4 must equal its worker's model and the striped file the
stripes; and after the unmount ``e2fsck -fn`` must find the image clean.

``test_fsx`` runs two fsx-style histories at once, each on its own file through
the mount: random pwrite, write, append (O_APPEND), ftruncate and truncate(2),
writes and reads through MAP_SHARED mappings, copy_file_range within the file,
reads through a second descriptor, fsync, and reopening, with op sizes up to
1 MiB, each mirrored into a bytearray: every read and the size after every
operation are checked, the whole file every ``FSX_CHECK_EVERY`` operations and
at the end, and the final content on the backing ext4.

Unlike test_random_ops (one process, small files, the mount compared with ext4
step by step), these check what only concurrency and long histories reach: the
kernel's caches of several processes' views, pages shared between writers,
descriptors outliving their names, listings racing changes.

``FLTFUSE_STRESS_OPS`` (operations per worker), ``FLTFUSE_STRESS_WORKERS``,
``FLTFUSE_FSX_OPS`` (per history) and ``FLTFUSE_STRESS_SEED`` size and seed a
run. A worker's private sequence depends on its seed alone, so a private
failure replays with ``run_private`` on any directory
(``test_the_private_model_is_ext4s`` runs it on ext4 itself, which keeps the
model honest); an fsx failure replays with ``run_fsx`` and its seed. A hung
mount fails the test after a deadline, and its FUSE connection is aborted so
that no process is left waiting on it.

Found by it: a LINK could deadlock the daemon against an unlink in another
directory of the file (fixed, and pinned by
``test_a_link_racing_an_unlink_elsewhere_does_not_hang``). Seen and left
alone: the kernel itself may refuse a link(2) with ENOENT while another link of
the same file is being made (see :func:`_link_churn`); on the shared directory
that is a race errno anyway.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import hashlib
import mmap
import multiprocessing
import multiprocessing.connection
import os
import random
import re
import stat
import subprocess
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from fltfuse.testing import MountedVolume, mounted_volume

from ..conftest import _fltmc
from .conftest import _STACKS
from .differential import RENAME_EXCHANGE, RENAME_NOREPLACE, renameat2
from .test_random_ops import SLOTS, Side, attribute_mismatches, describe, tree_state

DEFAULT_WORKERS = 4
DEFAULT_OPS = 5000
DEFAULT_FSX_OPS = 10_000
DEFAULT_SEED = 20_250_611
FSX_HISTORIES = 2
STRESS_STACKS = ("empty", "transparent", "contexts")
VERIFY_EVERY = 500
FSX_CHECK_EVERY = 1000
UMASK = 0o022

_ENV_OPS = int(os.environ.get("FLTFUSE_STRESS_OPS", DEFAULT_OPS))
_ENV_WORKERS = int(os.environ.get("FLTFUSE_STRESS_WORKERS", DEFAULT_WORKERS))
_ENV_FSX_OPS = int(os.environ.get("FLTFUSE_FSX_OPS", DEFAULT_FSX_OPS))
_ENV_SEED = int(os.environ.get("FLTFUSE_STRESS_SEED", DEFAULT_SEED))


class ModelMismatch(AssertionError):
    """The file system answered what the model says it cannot (a wrong value or errno)."""


def _errname(code: int | None) -> str:
    return "success" if code is None else errno.errorcode.get(code, str(code))


def _data(rng: random.Random, largest: int = 200_000) -> bytes:
    """Random bytes of a length that is small more often than large."""
    return rng.randbytes(max(1, min(largest, int(2 ** rng.uniform(0, 17.6)))))


def _pick(rng: random.Random, choices: list[tuple[int, Callable[[], tuple[str, tuple[Any, ...]]]]]) -> Any:
    """One of ``choices`` (weight, make), by weight: what its ``make()`` returns."""
    pick = rng.uniform(0, sum(weight for weight, _ in choices))
    for weight, make in choices:
        pick -= weight
        if pick <= 0:
            return make()
    return choices[-1][1]()


def _write_at(buffer: bytearray, offset: int, data: bytes) -> None:
    """What a write does to a file's bytes: a hole of zeros before ``offset`` if it is past the end."""
    if offset > len(buffer):
        buffer.extend(bytes(offset - len(buffer)))
    buffer[offset : offset + len(data)] = data


def _resize(buffer: bytearray, size: int) -> None:
    """What truncate(2) does to a file's bytes."""
    if size < len(buffer):
        del buffer[size:]
    else:
        buffer.extend(bytes(size - len(buffer)))


def _difference(what: str, actual: bytes, expected: bytes, offset: int = 0) -> ModelMismatch:
    """A mismatch of bytes read at ``offset`` and what the model holds there, naming where they part."""
    first = next((i for i, (a, b) in enumerate(zip(actual, expected, strict=False)) if a != b), None)
    where = offset + first if first is not None else offset + min(len(actual), len(expected))
    return ModelMismatch(
        f"{what} at {offset}: {len(actual)} bytes, the model has {len(expected)}; they part at {where}"
    )


# == the private tree and its model ============================================================

PRIVATE_TOP = ("a", "b", "c", "d", "e")
PRIVATE_PATHS = PRIVATE_TOP + tuple(f"{t}/{s}" for t in PRIVATE_TOP for s in ("x", "y", "z"))
PRIVATE_DIRS = ("", *PRIVATE_TOP)
XATTRS = ("user.s0", "user.s1")
FILE_MODES = (0o644, 0o600, 0o755, 0o700, 0o000, 0o444)
DIR_MODES = (0o755, 0o700, 0o777)


def _dangling_target(rng: random.Random) -> str:
    """A symlink target that never resolves: no name in any tree is called "nowhere"."""
    return f"nowhere/{rng.randrange(1000)}"


@dataclass(eq=False)
class Node:
    """One object of the model; hard links are names sharing a node."""

    kind: str  # "file", "dir" or "symlink"
    mode: int  # permission bits
    data: bytearray = field(default_factory=bytearray)
    target: str = ""
    xattrs: dict[str, bytes] = field(default_factory=dict)
    links: int = 1  # names (files and symlinks; a directory's count is computed)


@dataclass
class Slot:
    fd: int
    node: Node
    append: bool
    offset: int = 0


class PrivateModel:
    """What a directory only one process changes must contain, and what each operation on it must answer.

    Symlinks in it always dangle (see :func:`_dangling_target`), so every
    operation that follows one fails with ENOENT.
    """

    def __init__(self) -> None:
        self.names: dict[str, Node] = {}

    def parent_error(self, path: str) -> int | None:
        parts = path.split("/")
        for i in range(1, len(parts)):
            node = self.names.get("/".join(parts[:i]))
            if node is None or node.kind == "symlink":
                return errno.ENOENT
            if node.kind != "dir":
                return errno.ENOTDIR
        return None

    def lookup(self, path: str, follow: bool) -> tuple[int | None, Node | None]:
        """The error resolving ``path``, or the node it names (None: missing, which is no error)."""
        if path == "":
            return None, None
        err = self.parent_error(path)
        if err is not None:
            return err, None
        node = self.names.get(path)
        if follow and node is not None and node.kind == "symlink":
            return errno.ENOENT, None
        return None, node

    def existing(self, path: str, follow: bool = True) -> tuple[int | None, Node | None]:
        """Like :meth:`lookup`, but a missing name is ENOENT."""
        err, node = self.lookup(path, follow)
        if err is None and node is None and path != "":
            err = errno.ENOENT
        return err, node

    def with_xattr(self, path: str, name: str) -> tuple[int | None, Node | None]:
        """Like :meth:`existing`, but a file without extended attribute ``name`` is ENODATA."""
        err, node = self.existing(path)
        if err is None and node is not None and name not in node.xattrs:
            err = errno.ENODATA
        return err, node

    def children(self, path: str) -> list[str]:
        prefix = path + "/" if path else ""
        return sorted(n[len(prefix) :] for n in self.names if n.startswith(prefix) and "/" not in n[len(prefix) :])

    def nlink(self, path: str, node: Node) -> int:
        if node.kind != "dir":
            return node.links
        return 2 + sum(1 for c in self.children(path) if self.names[f"{path}/{c}" if path else c].kind == "dir")

    def remove(self, path: str) -> None:
        node = self.names.pop(path)
        node.links -= 1

    def rename_error(self, src: str, dst: str, flags: int) -> int | None:
        """rename(2)'s answer, in the order the kernel checks (do_renameat2, then vfs_rename)."""
        err = self.parent_error(src) or self.parent_error(dst)  # both parents are resolved first
        if err is not None:
            return err
        node, target = self.names.get(src), self.names.get(dst)
        if node is None:
            return errno.ENOENT
        if flags & RENAME_NOREPLACE and target is not None:
            return errno.EEXIST
        if flags & RENAME_EXCHANGE and target is None:
            return errno.ENOENT
        if dst.startswith(src + "/") or (flags & RENAME_EXCHANGE and src.startswith(dst + "/")):
            return errno.EINVAL  # a directory into its own subtree (or, exchanging, the other way)
        if src.startswith(dst + "/"):
            return errno.ENOTEMPTY  # the target is an ancestor of the source
        if target is node:
            return None  # two names of one object: rename does nothing
        if target is None or flags & RENAME_EXCHANGE:
            return None
        if node.kind == "dir" and target.kind != "dir":
            return errno.ENOTDIR
        if node.kind != "dir" and target.kind == "dir":
            return errno.EISDIR
        if target.kind == "dir" and self.children(dst):
            return errno.ENOTEMPTY
        return None

    def rename(self, src: str, dst: str, flags: int) -> None:
        """Apply a rename :meth:`rename_error` allowed."""
        node, target = self.names[src], self.names.get(dst)
        if target is node:
            return
        moved = {p: n for p, n in self.names.items() if p == src or p.startswith(src + "/")}
        if flags & RENAME_EXCHANGE:
            assert target is not None
            other = {p: n for p, n in self.names.items() if p == dst or p.startswith(dst + "/")}
            for p in [*moved, *other]:
                del self.names[p]
            self.names.update({dst + p[len(src) :]: n for p, n in moved.items()})
            self.names.update({src + p[len(dst) :]: n for p, n in other.items()})
            return
        if target is not None:
            self.remove(dst)
        for p in moved:
            del self.names[p]
        self.names.update({dst + p[len(src) :]: n for p, n in moved.items()})

    def snapshot(self) -> dict[str, tuple[Any, ...]]:
        """Every name with what must be true of it (the shape of :func:`snapshot_tree`)."""
        out = {}
        for path, node in self.names.items():
            if node.kind == "file":
                detail: Any = (len(node.data), hashlib.sha256(node.data).hexdigest())
            elif node.kind == "symlink":
                detail = node.target
            else:
                detail = None
            out[path] = (node.kind, node.mode, self.nlink(path, node), detail, dict(sorted(node.xattrs.items())))
        return out


def snapshot_tree(root: str) -> dict[str, tuple[Any, ...]]:
    """The tree under ``root`` as :meth:`PrivateModel.snapshot` describes a model."""
    out = {}
    pending = [""]
    while pending:
        rel = pending.pop()
        for name in os.listdir(os.path.join(root, rel)):
            child = f"{rel}/{name}" if rel else name
            full = os.path.join(root, child)
            st = os.lstat(full)
            xattrs = {n: os.getxattr(full, n, follow_symlinks=False) for n in os.listxattr(full, follow_symlinks=False)}
            detail: Any = None
            if stat.S_ISDIR(st.st_mode):
                kind = "dir"
                pending.append(child)
            elif stat.S_ISLNK(st.st_mode):
                kind, detail = "symlink", os.readlink(full)
            else:
                with open(full, "rb") as f:
                    content = f.read()
                kind, detail = "file", (st.st_size, hashlib.sha256(content).hexdigest())
                if len(content) != st.st_size:
                    detail = ("read", len(content), "stat", st.st_size)
            mode = 0o777 if kind == "symlink" else stat.S_IMODE(st.st_mode)
            out[child] = (kind, mode, st.st_nlink, detail, dict(sorted(xattrs.items())))
    return out


class PrivateRun:
    """A seeded sequence of operations on a private directory, each checked against :class:`PrivateModel`."""

    label = "private"

    def __init__(self, root: str, seed: int):
        self.root = root
        self.rng = random.Random(seed)
        self.model = PrivateModel()
        self.slots: list[Slot | None] = [None] * 3

    def path(self, rel: str) -> str:
        return os.path.join(self.root, rel) if rel else self.root

    def close(self) -> None:
        for i, slot in enumerate(self.slots):
            if slot is not None:
                os.close(slot.fd)
                self.slots[i] = None

    # -- checking ------------------------------------------------------------------------------

    def expect(self, expected: int | None, action: Callable[[], Any]) -> tuple[bool, Any]:
        """Run ``action``; it must fail with ``expected`` (or succeed when None). (succeeded, value)."""
        try:
            value = action()
        except OSError as exc:
            if exc.errno != expected:
                raise ModelMismatch(
                    f"failed with {_errname(exc.errno)}, the model expects {_errname(expected)}"
                ) from exc
            return False, None
        if expected is not None:
            raise ModelMismatch(f"succeeded, the model expects {_errname(expected)}")
        return True, value

    @staticmethod
    def check(what: str, actual: Any, expected: Any) -> None:
        if actual != expected:
            if isinstance(actual, bytes) and isinstance(expected, bytes):
                raise _difference(what, actual, expected)
            raise ModelMismatch(f"{what}: {actual!r}, the model has {expected!r}")

    def verify_all(self) -> None:
        actual, expected = snapshot_tree(self.root), self.model.snapshot()
        if actual != expected:
            lines = [
                f"  {p}: tree {actual.get(p)!r}, model {expected.get(p)!r}"
                for p in sorted(set(actual) | set(expected))
                if actual.get(p) != expected.get(p)
            ]
            raise ModelMismatch("the tree differs from the model:\n" + "\n".join(lines[:20]))
        for slot in self.slots:
            if slot is not None:
                self.check("fstat size of an open slot", os.fstat(slot.fd).st_size, len(slot.node.data))

    # -- generating ----------------------------------------------------------------------------

    def pick_path(self) -> str:
        """Half the time a name that exists (so operations mostly succeed), else one that may not."""
        if self.model.names and self.rng.random() < 0.5:
            return self.rng.choice(sorted(self.model.names))
        return self.rng.choice(PRIVATE_TOP if self.rng.random() < 0.5 else PRIVATE_PATHS)

    def generate(self) -> tuple[str, tuple[Any, ...]]:
        rng = self.rng
        path, other = self.pick_path(), self.pick_path()
        fresh = rng.choice(PRIVATE_PATHS)  # a link's name: mostly one that does not exist yet
        open_slots = [i for i, s in enumerate(self.slots) if s is not None]
        choices: list[tuple[int, Callable[[], tuple[str, tuple[Any, ...]]]]] = [
            (8, lambda: ("create", (path, rng.random() < 0.3, rng.random() < 0.2, rng.choice(FILE_MODES), _data(rng)))),
            (4, lambda: ("mkdir", (path, rng.choice(DIR_MODES)))),
            (3, lambda: ("rmdir", (path,))),
            (4, lambda: ("unlink", (path,))),
            (2, lambda: ("symlink", (path, _dangling_target(rng)))),
            (3, lambda: ("link", (path, fresh))),
            (5, lambda: ("rename", (path, other, rng.choice((0, 0, 0, RENAME_NOREPLACE, RENAME_EXCHANGE))))),
            (3, lambda: ("truncate", (path, rng.choice((0, 1, 4095, 4097, rng.randrange(300_000)))))),
            (2, lambda: ("chmod", (path, rng.choice(FILE_MODES + DIR_MODES)))),
            (2, lambda: ("setxattr", (path, rng.choice(XATTRS), _data(rng, 200), rng.choice((0, 0, 1, 2))))),
            (1, lambda: ("removexattr", (path, rng.choice(XATTRS)))),
            (1, lambda: ("getxattr", (path, rng.choice(XATTRS)))),
            (1, lambda: ("listxattr", (path,))),
            (6, lambda: ("pwrite", (path, rng.randrange(300_000), _data(rng)))),
            (3, lambda: ("append", (path, _data(rng)))),
            (6, lambda: ("read", (path, rng.randrange(300_000), rng.choice((1, 4096, 65536, 300_000))))),
            (3, lambda: ("mmap_write", (path, rng.randrange(300_000), _data(rng, 20_000), rng.random() < 0.5))),
            (2, lambda: ("mmap_read", (path, rng.randrange(300_000), rng.choice((1, 4096, 20_000))))),
            (4, lambda: ("stat", (path,))),
            (2, lambda: ("listdir", (rng.choice(PRIVATE_DIRS),))),
            (3, lambda: ("slot_open", (rng.randrange(len(self.slots)), path, rng.random() < 0.3))),
        ]
        if open_slots:
            slot = rng.choice(open_slots)
            choices += [
                (4, lambda: ("slot_write", (slot, _data(rng)))),
                (3, lambda: ("slot_pwrite", (slot, rng.randrange(300_000), _data(rng)))),
                (3, lambda: ("slot_read", (slot, rng.choice((1, 4096, 100_000))))),
                (2, lambda: ("slot_ftruncate", (slot, rng.randrange(300_000)))),
                (2, lambda: ("slot_fstat", (slot,))),
                (1, lambda: ("slot_fsync", (slot,))),
                (3, lambda: ("slot_close", (slot,))),
            ]
        return _pick(rng, choices)  # type: ignore[no-any-return]

    def apply(self, name: str, args: tuple[Any, ...]) -> str:
        """Run one generated operation, check it, update the model; what it answered ("ok" or an errno name)."""
        return getattr(self, "op_" + name)(*args)  # type: ignore[no-any-return]

    # -- operations (each returns "ok" or the errno name it expected and got) -------------------

    def _result(self, ok: bool, expected: int | None) -> str:
        return "ok" if ok else _errname(expected)

    def _open_error(self, path: str, write: bool) -> tuple[int | None, Node | None]:
        err, node = self.model.existing(path)
        if err is None and node is not None and node.kind == "dir" and write:
            err = errno.EISDIR
        return err, node

    def op_create(self, path: str, excl: bool, trunc: bool, mode: int, data: bytes) -> str:
        err, node = self.model.lookup(path, follow=False)
        if err is None and node is not None:
            if excl:
                err = errno.EEXIST
            elif node.kind == "dir":
                err = errno.EISDIR
            elif node.kind == "symlink":
                err = errno.ENOENT  # open(O_CREAT) follows it to a parent that does not exist
        flags = os.O_CREAT | os.O_WRONLY | (os.O_EXCL if excl else 0) | (os.O_TRUNC if trunc else 0)
        ok, fd = self.expect(err, lambda: os.open(self.path(path), flags, mode))
        if ok:
            try:
                if node is None:
                    node = self.model.names[path] = Node("file", mode & ~UMASK)
                elif trunc:
                    node.data.clear()
                self.check("write count", os.write(fd, data), len(data))
                _write_at(node.data, 0, data)
            finally:
                os.close(fd)
        return self._result(ok, err)

    def op_mkdir(self, path: str, mode: int) -> str:
        err, node = self.model.lookup(path, follow=False)
        if err is None and node is not None:
            err = errno.EEXIST
        ok, _ = self.expect(err, lambda: os.mkdir(self.path(path), mode))
        if ok:
            self.model.names[path] = Node("dir", mode & ~UMASK)
        return self._result(ok, err)

    def op_rmdir(self, path: str) -> str:
        err, node = self.model.existing(path, follow=False)
        if err is None and node is not None:
            if node.kind != "dir":
                err = errno.ENOTDIR
            elif self.model.children(path):
                err = errno.ENOTEMPTY
        ok, _ = self.expect(err, lambda: os.rmdir(self.path(path)))
        if ok:
            self.model.remove(path)
        return self._result(ok, err)

    def op_unlink(self, path: str) -> str:
        err, node = self.model.existing(path, follow=False)
        if err is None and node is not None and node.kind == "dir":
            err = errno.EISDIR
        ok, _ = self.expect(err, lambda: os.unlink(self.path(path)))
        if ok:
            self.model.remove(path)
        return self._result(ok, err)

    def op_symlink(self, path: str, target: str) -> str:
        err, node = self.model.lookup(path, follow=False)
        if err is None and node is not None:
            err = errno.EEXIST
        ok, _ = self.expect(err, lambda: os.symlink(target, self.path(path)))
        if ok:
            self.model.names[path] = Node("symlink", 0o777, target=target)
        return self._result(ok, err)

    def op_link(self, src: str, dst: str) -> str:
        err, node = self.model.existing(src, follow=False)
        if err is None:
            err, target = self.model.lookup(dst, follow=False)
            if err is None and target is not None:
                err = errno.EEXIST
            elif err is None and node is not None and node.kind == "dir":
                err = errno.EPERM
        ok, _ = self.expect(err, lambda: os.link(self.path(src), self.path(dst), follow_symlinks=False))
        if ok:
            assert node is not None
            node.links += 1
            self.model.names[dst] = node
        return self._result(ok, err)

    def op_rename(self, src: str, dst: str, flags: int) -> str:
        err = self.model.rename_error(src, dst, flags)
        ok, _ = self.expect(err, lambda: renameat2(self.path(src), self.path(dst), flags))
        if ok:
            self.model.rename(src, dst, flags)
        return self._result(ok, err)

    def op_truncate(self, path: str, size: int) -> str:
        err, node = self._open_error(path, write=True)
        ok, _ = self.expect(err, lambda: os.truncate(self.path(path), size))
        if ok:
            assert node is not None
            _resize(node.data, size)
        return self._result(ok, err)

    def op_chmod(self, path: str, mode: int) -> str:
        err, node = self.model.existing(path)
        ok, _ = self.expect(err, lambda: os.chmod(self.path(path), mode))
        if ok:
            assert node is not None
            node.mode = mode
        return self._result(ok, err)

    def op_setxattr(self, path: str, name: str, value: bytes, flags: int) -> str:
        err, node = self.model.existing(path)
        if err is None and node is not None:
            if flags == os.XATTR_CREATE and name in node.xattrs:
                err = errno.EEXIST
            elif flags == os.XATTR_REPLACE and name not in node.xattrs:
                err = errno.ENODATA
        ok, _ = self.expect(err, lambda: os.setxattr(self.path(path), name, value, flags))
        if ok:
            assert node is not None
            node.xattrs[name] = value
        return self._result(ok, err)

    def op_removexattr(self, path: str, name: str) -> str:
        err, node = self.model.with_xattr(path, name)
        ok, _ = self.expect(err, lambda: os.removexattr(self.path(path), name))
        if ok:
            assert node is not None
            del node.xattrs[name]
        return self._result(ok, err)

    def op_getxattr(self, path: str, name: str) -> str:
        err, node = self.model.with_xattr(path, name)
        ok, value = self.expect(err, lambda: os.getxattr(self.path(path), name))
        if ok:
            assert node is not None
            self.check("xattr value", value, node.xattrs[name])
        return self._result(ok, err)

    def op_listxattr(self, path: str) -> str:
        err, node = self.model.existing(path)
        ok, value = self.expect(err, lambda: sorted(os.listxattr(self.path(path))))
        if ok:
            assert node is not None
            self.check("xattr names", value, sorted(node.xattrs))
        return self._result(ok, err)

    def _with_fd(self, path: str, flags: int, use: Callable[[int, Node], None]) -> str:
        """Open ``path`` (as the model predicts), ``use(fd, node)``, close."""
        err, node = self._open_error(path, write=flags & os.O_ACCMODE != os.O_RDONLY)
        ok, fd = self.expect(err, lambda: os.open(self.path(path), flags))
        if ok:
            assert node is not None
            try:
                use(fd, node)
            finally:
                os.close(fd)
        return self._result(ok, err)

    def op_pwrite(self, path: str, offset: int, data: bytes) -> str:
        def use(fd: int, node: Node) -> None:
            self.check("pwrite count", os.pwrite(fd, data, offset), len(data))
            _write_at(node.data, offset, data)

        return self._with_fd(path, os.O_WRONLY, use)

    def op_append(self, path: str, data: bytes) -> str:
        def use(fd: int, node: Node) -> None:
            self.check("append count", os.write(fd, data), len(data))
            _write_at(node.data, len(node.data), data)
            self.check("offset after an append", os.lseek(fd, 0, os.SEEK_CUR), len(node.data))

        return self._with_fd(path, os.O_WRONLY | os.O_APPEND, use)

    def op_read(self, path: str, offset: int, size: int) -> str:
        def use(fd: int, node: Node) -> None:
            if node.kind == "dir":
                self.expect(errno.EISDIR, lambda: os.pread(fd, size, offset))
            else:
                self.check(
                    f"pread({size}, {offset})", os.pread(fd, size, offset), bytes(node.data[offset : offset + size])
                )

        return self._with_fd(path, os.O_RDONLY, use)

    def op_mmap_write(self, path: str, offset: int, data: bytes, sync: bool) -> str:
        def use(fd: int, node: Node) -> None:
            if not node.data:
                return  # nothing to map
            start = offset % len(node.data)
            chunk = data[: len(node.data) - start]
            with mmap.mmap(fd, len(node.data), flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE) as m:
                m[start : start + len(chunk)] = chunk
                if sync:
                    m.flush()
            _write_at(node.data, start, chunk)

        return self._with_fd(path, os.O_RDWR, use)

    def op_mmap_read(self, path: str, offset: int, size: int) -> str:
        def use(fd: int, node: Node) -> None:
            if not node.data:
                return
            start = offset % len(node.data)
            with mmap.mmap(fd, len(node.data), flags=mmap.MAP_SHARED, prot=mmap.PROT_READ) as m:
                self.check("mapped bytes", m[start : start + size], bytes(node.data[start : start + size]))

        return self._with_fd(path, os.O_RDONLY, use)

    def op_stat(self, path: str) -> str:
        err, node = self.model.existing(path, follow=False)
        ok, st = self.expect(err, lambda: os.lstat(self.path(path)))
        if ok:
            assert node is not None
            kind = "dir" if stat.S_ISDIR(st.st_mode) else "symlink" if stat.S_ISLNK(st.st_mode) else "file"
            self.check("type", kind, node.kind)
            self.check("mode", stat.S_IMODE(st.st_mode), node.mode)
            self.check("link count", st.st_nlink, self.model.nlink(path, node))
            if node.kind != "dir":
                self.check("size", st.st_size, len(node.data) if node.kind == "file" else len(node.target))
        return self._result(ok, err)

    def op_listdir(self, path: str) -> str:
        err, node = self.model.existing(path)
        if err is None and node is not None and node.kind != "dir":
            err = errno.ENOTDIR
        ok, names = self.expect(err, lambda: os.listdir(self.path(path)))
        if ok:
            self.check("listing", sorted(names), self.model.children(path))
            self.check("names listed twice", len(names), len(set(names)))
        return self._result(ok, err)

    def op_slot_open(self, slot: int, path: str, append: bool) -> str:
        self.op_slot_close(slot)
        err, node = self._open_error(path, write=True)
        ok, fd = self.expect(err, lambda: os.open(self.path(path), os.O_RDWR | (os.O_APPEND if append else 0)))
        if ok:
            assert node is not None
            self.slots[slot] = Slot(fd, node, append)
        return self._result(ok, err)

    def _slot(self, slot: int) -> Slot:
        s = self.slots[slot]
        assert s is not None
        return s

    def op_slot_write(self, slot: int, data: bytes) -> str:
        s = self._slot(slot)
        self.check("write count", os.write(s.fd, data), len(data))
        if s.append:
            s.offset = len(s.node.data)
        _write_at(s.node.data, s.offset, data)
        s.offset += len(data)
        self.check("offset after a write", os.lseek(s.fd, 0, os.SEEK_CUR), s.offset)
        return "ok"

    def op_slot_pwrite(self, slot: int, offset: int, data: bytes) -> str:
        s = self._slot(slot)
        self.check("pwrite count", os.pwrite(s.fd, data, offset), len(data))
        _write_at(s.node.data, len(s.node.data) if s.append else offset, data)  # Linux: O_APPEND wins over the offset
        return "ok"

    def op_slot_read(self, slot: int, size: int) -> str:
        s = self._slot(slot)
        self.check(f"read({size}) at {s.offset}", os.read(s.fd, size), bytes(s.node.data[s.offset : s.offset + size]))
        s.offset = max(s.offset, min(s.offset + size, len(s.node.data)))
        return "ok"

    def op_slot_ftruncate(self, slot: int, size: int) -> str:
        s = self._slot(slot)
        os.ftruncate(s.fd, size)
        _resize(s.node.data, size)
        return "ok"

    def op_slot_fstat(self, slot: int) -> str:
        s = self._slot(slot)
        st = os.fstat(s.fd)
        self.check("fstat size", st.st_size, len(s.node.data))
        self.check("fstat link count", st.st_nlink, s.node.links)
        self.check("fstat mode", stat.S_IMODE(st.st_mode), s.node.mode)
        return "ok"

    def op_slot_fsync(self, slot: int) -> str:
        os.fsync(self._slot(slot).fd)
        return "ok"

    def op_slot_close(self, slot: int) -> str:
        s = self.slots[slot]
        if s is not None:
            self.slots[slot] = None
            os.close(s.fd)
        return "ok"


def run_private(root: str, seed: int, ops: int) -> collections.Counter[str]:
    """A private sequence alone (a reproducer): how often each operation answered what ("mkdir: EEXIST").

    Raises :class:`ModelMismatch` with the seed, the step and the steps before it.
    """
    run = PrivateRun(root, seed)
    history: collections.deque[str] = collections.deque(maxlen=30)
    counts: collections.Counter[str] = collections.Counter()
    try:
        for step in range(ops):
            name, args = run.generate()
            history.append(f"{step}: {describe(name, args)}")
            try:
                counts[f"{name}: {run.apply(name, args)}"] += 1
                if step % VERIFY_EVERY == VERIFY_EVERY - 1:
                    run.verify_all()
            except ModelMismatch as exc:
                raise ModelMismatch(f"{exc}\nseed {seed}, step {step}; last steps:\n" + "\n".join(history)) from exc
        run.verify_all()
    finally:
        run.close()
    return counts


# == the shared directory =========================================================================

SHARED_TOP = tuple(f"n{i}" for i in range(8))
# long names so a listing of the shared directory takes several READDIR requests
FILLERS = tuple(f"fill-{i:02d}-" + "f" * 90 for i in range(48))
SHARED_TOP_PATHS = SHARED_TOP + FILLERS[:12]  # the names operations use at the top (the other fillers stay)
SHARED_PATHS = SHARED_TOP_PATHS + tuple(f"n{i}/m{j}" for i in range(8) for j in range(3))
STRIPES = "stripes"
SHARED_NAMES = frozenset(SHARED_TOP + FILLERS + ("m0", "m1", "m2", STRIPES))  # every name a listing may show
RACE_ERRNOS = frozenset({errno.ENOENT, errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR})
# what an operation's own arguments explain, on top of the races
EXTRA_ERRNOS = {
    "rename": {errno.EINVAL},  # a directory into its own subtree
    "link": {errno.EPERM},  # a link to a directory
    "readlink": {errno.EINVAL},  # not a symlink
    "setxattr": {errno.ENODATA},  # XATTR_REPLACE of a missing one
    "removexattr": {errno.ENODATA},
    "getxattr": {errno.ENODATA},
}
# Operations on a descriptor that opened must not fail at all (its name may be gone).
FD_OPS = frozenset({"slot_pwrite", "slot_read", "slot_fstat", "slot_ftruncate", "slot_fsync", "slot_close"})


class SharedRun:
    """Random operations on the shared directory, where all workers race, and on this worker's stripe.

    Shared files are never mapped: another worker may truncate one under the
    mapping, and touching a page past the end then kills the process with
    SIGBUS, as on any file system. Mappings are exercised on the stripes file,
    whose size never changes.
    """

    label = "shared"

    def __init__(self, root: str, seed: int, stripe_offset: int, stripe_size: int):
        self.root = root
        self.rng = random.Random(seed)
        self.slots: list[int | None] = [None] * 3
        self.stripe_offset = stripe_offset
        self.stripe = bytearray(stripe_size)
        self.stripe_fd = os.open(os.path.join(root, STRIPES), os.O_RDWR)
        self.stripes_size = os.fstat(self.stripe_fd).st_size

    def path(self, rel: str) -> str:
        return os.path.join(self.root, rel) if rel else self.root

    def close(self) -> None:
        for i, fd in enumerate(self.slots):
            if fd is not None:
                os.close(fd)
                self.slots[i] = None
        os.close(self.stripe_fd)

    def generate(self) -> tuple[str, tuple[Any, ...]]:
        rng = self.rng
        path, other = (rng.choice(SHARED_TOP_PATHS if rng.random() < 0.6 else SHARED_PATHS) for _ in range(2))
        at = rng.randrange(len(self.stripe))
        open_slots = [i for i, fd in enumerate(self.slots) if fd is not None]
        choices: list[tuple[int, Callable[[], tuple[str, tuple[Any, ...]]]]] = [
            (6, lambda: ("create", (path, rng.random() < 0.3, _data(rng, 70_000)))),
            (4, lambda: ("pwrite", (path, rng.randrange(200_000), _data(rng, 70_000)))),
            (3, lambda: ("append", (path, _data(rng, 20_000)))),
            (3, lambda: ("truncate", (path, rng.randrange(200_000)))),
            (3, lambda: ("read", (path, rng.randrange(200_000), rng.choice((1, 4096, 100_000))))),
            (6, lambda: ("rename", (path, other, rng.choice((0, 0, 0, RENAME_NOREPLACE, RENAME_EXCHANGE))))),
            (3, lambda: ("link", (path, other))),
            (5, lambda: ("unlink", (path,))),
            (4, lambda: ("mkdir", (path, rng.choice(DIR_MODES)))),
            (3, lambda: ("rmdir", (path,))),
            (2, lambda: ("symlink", (path, _dangling_target(rng)))),
            (1, lambda: ("readlink", (path,))),
            (2, lambda: ("setxattr", (path, rng.choice(XATTRS), _data(rng, 200), rng.choice((0, 0, 1, 2))))),
            (1, lambda: ("getxattr", (path, rng.choice(XATTRS)))),
            (1, lambda: ("removexattr", (path, rng.choice(XATTRS)))),
            (2, lambda: ("chmod", (path, rng.choice(FILE_MODES + DIR_MODES)))),
            (2, lambda: ("fsync", (path,))),
            (3, lambda: ("stat", (path,))),
            (4, lambda: ("listdir", (rng.choice(("", *SHARED_TOP[:3])),))),
            (3, lambda: ("slot_open", (rng.randrange(len(self.slots)), path, rng.random() < 0.3))),
            (3, lambda: ("stripe_pwrite", (at, _data(rng, len(self.stripe) - at)))),
            (3, lambda: ("stripe_mmap_write", (at, _data(rng, len(self.stripe) - at), rng.random() < 0.5))),
            (2, lambda: ("stripe_pread", (at, rng.randrange(1, len(self.stripe) + 1)))),
            (2, lambda: ("stripe_mmap_read", (at, rng.randrange(1, len(self.stripe) + 1)))),
        ]
        if open_slots:
            slot = rng.choice(open_slots)
            choices += [
                (4, lambda: ("slot_pwrite", (slot, rng.randrange(200_000), _data(rng, 70_000)))),
                (2, lambda: ("slot_read", (slot, rng.randrange(200_000), rng.choice((1, 4096, 100_000))))),
                (2, lambda: ("slot_fstat", (slot,))),
                (1, lambda: ("slot_ftruncate", (slot, rng.randrange(200_000)))),
                (1, lambda: ("slot_fsync", (slot,))),
                (3, lambda: ("slot_close", (slot,))),
            ]
        return _pick(rng, choices)  # type: ignore[no-any-return]

    def apply(self, name: str, args: tuple[Any, ...]) -> str:
        """Run one operation; "ok" or the errno it failed with, which must be one a race explains."""
        try:
            getattr(self, "op_" + name)(*args)
        except OSError as exc:
            allowed = (
                set() if name in FD_OPS or name.startswith("stripe_") else RACE_ERRNOS | EXTRA_ERRNOS.get(name, set())
            )
            if exc.errno not in allowed:
                raise ModelMismatch(f"failed with {_errname(exc.errno)}, which no race explains") from exc
            return _errname(exc.errno)
        return "ok"

    # -- on the shared names -----------------------------------------------------------------

    def _with_fd(self, path: str, flags: int, use: Callable[[int], object]) -> None:
        fd = os.open(self.path(path), flags, 0o644)
        try:
            use(fd)
        finally:
            os.close(fd)

    def op_create(self, path: str, excl: bool, data: bytes) -> None:
        flags = os.O_CREAT | os.O_WRONLY | (os.O_EXCL if excl else os.O_TRUNC)
        self._with_fd(path, flags, lambda fd: self._expect_count(os.write(fd, data), data))

    def op_pwrite(self, path: str, offset: int, data: bytes) -> None:
        self._with_fd(path, os.O_WRONLY, lambda fd: self._expect_count(os.pwrite(fd, data, offset), data))

    def op_append(self, path: str, data: bytes) -> None:
        self._with_fd(path, os.O_WRONLY | os.O_APPEND, lambda fd: self._expect_count(os.write(fd, data), data))

    def op_truncate(self, path: str, size: int) -> None:
        os.truncate(self.path(path), size)

    def op_read(self, path: str, offset: int, size: int) -> None:
        self._with_fd(path, os.O_RDONLY, lambda fd: os.pread(fd, size, offset))

    def op_rename(self, src: str, dst: str, flags: int) -> None:
        renameat2(self.path(src), self.path(dst), flags)

    def op_link(self, src: str, dst: str) -> None:
        os.link(self.path(src), self.path(dst), follow_symlinks=False)

    def op_unlink(self, path: str) -> None:
        os.unlink(self.path(path))

    def op_mkdir(self, path: str, mode: int) -> None:
        os.mkdir(self.path(path), mode)

    def op_rmdir(self, path: str) -> None:
        os.rmdir(self.path(path))

    def op_symlink(self, path: str, target: str) -> None:
        os.symlink(target, self.path(path))

    def op_readlink(self, path: str) -> None:
        target = os.readlink(self.path(path))
        if not target.startswith("nowhere/"):
            raise ModelMismatch(f"readlink answered {target!r}, which no worker made")

    def op_setxattr(self, path: str, name: str, value: bytes, flags: int) -> None:
        os.setxattr(self.path(path), name, value, flags)

    def op_getxattr(self, path: str, name: str) -> None:
        os.getxattr(self.path(path), name)

    def op_removexattr(self, path: str, name: str) -> None:
        os.removexattr(self.path(path), name)

    def op_chmod(self, path: str, mode: int) -> None:
        os.chmod(self.path(path), mode)

    def op_fsync(self, path: str) -> None:
        self._with_fd(path, os.O_RDONLY, os.fsync)

    def op_stat(self, path: str) -> None:
        os.lstat(self.path(path))

    def op_listdir(self, path: str) -> None:
        names = os.listdir(self.path(path))
        twice = sorted(n for n, count in collections.Counter(names).items() if count > 1)
        if twice:
            raise ModelMismatch(f"a listing showed names twice: {twice}")
        unknown = sorted(set(names) - SHARED_NAMES)
        if unknown:
            raise ModelMismatch(f"a listing showed names no worker made: {unknown}")

    def op_slot_open(self, slot: int, path: str, create: bool) -> None:
        self.op_slot_close(slot)
        self.slots[slot] = os.open(self.path(path), os.O_RDWR | (os.O_CREAT if create else 0), 0o644)

    def _fd(self, slot: int) -> int:
        fd = self.slots[slot]
        assert fd is not None
        return fd

    def op_slot_pwrite(self, slot: int, offset: int, data: bytes) -> None:
        self._expect_count(os.pwrite(self._fd(slot), data, offset), data)

    def op_slot_read(self, slot: int, offset: int, size: int) -> None:
        os.pread(self._fd(slot), size, offset)

    def op_slot_fstat(self, slot: int) -> None:
        os.fstat(self._fd(slot))

    def op_slot_ftruncate(self, slot: int, size: int) -> None:
        os.ftruncate(self._fd(slot), size)

    def op_slot_fsync(self, slot: int) -> None:
        os.fsync(self._fd(slot))

    def op_slot_close(self, slot: int) -> None:
        fd = self.slots[slot]
        if fd is not None:
            self.slots[slot] = None
            os.close(fd)

    @staticmethod
    def _expect_count(count: int, data: bytes) -> None:
        if count != len(data):
            raise ModelMismatch(f"a write of {len(data)} bytes wrote {count}")

    # -- on this worker's stripe (exact) ---------------------------------------------------------

    def op_stripe_pwrite(self, at: int, data: bytes) -> None:
        self._expect_count(os.pwrite(self.stripe_fd, data, self.stripe_offset + at), data)
        self.stripe[at : at + len(data)] = data

    def _mapping(self, writable: bool) -> mmap.mmap:
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        return mmap.mmap(self.stripe_fd, self.stripes_size, flags=mmap.MAP_SHARED, prot=prot)

    def op_stripe_mmap_write(self, at: int, data: bytes, sync: bool) -> None:
        with self._mapping(writable=True) as m:
            start = self.stripe_offset + at
            m[start : start + len(data)] = data
            if sync:
                m.flush()
        self.stripe[at : at + len(data)] = data

    def _check_stripe(self, how: str, at: int, actual: bytes) -> None:
        expected = bytes(self.stripe[at : at + len(actual)])
        if actual != expected:
            raise _difference(f"{how} of the stripe", actual, expected, at)

    def op_stripe_pread(self, at: int, size: int) -> None:
        size = min(size, len(self.stripe) - at)
        self._check_stripe("pread", at, os.pread(self.stripe_fd, size, self.stripe_offset + at))

    def op_stripe_mmap_read(self, at: int, size: int) -> None:
        size = min(size, len(self.stripe) - at)
        with self._mapping(writable=False) as m:
            start = self.stripe_offset + at
            self._check_stripe("a mapping's read", at, m[start : start + size])


# == the workers ===================================================================================


@dataclass(frozen=True)
class WorkerSpec:
    index: int
    seed: int
    ops: int
    private: str
    shared: str
    stripe_offset: int
    stripe_size: int


@dataclass
class WorkerReport:
    index: int
    failure: str | None
    counts: collections.Counter[str]
    model: dict[str, tuple[Any, ...]]
    stripe: bytes


def stress_worker(spec: WorkerSpec) -> WorkerReport:
    """One worker's run; a failure (a mismatch, an errno no race explains, a crash) ends it and is reported."""
    os.umask(UMASK)
    chooser = random.Random(spec.seed)
    private = PrivateRun(spec.private, spec.seed * 2 + 1)
    shared = SharedRun(spec.shared, spec.seed * 2 + 2, spec.stripe_offset, spec.stripe_size)
    history: collections.deque[str] = collections.deque(maxlen=30)
    counts: collections.Counter[str] = collections.Counter()
    failure = None
    step = -1
    try:
        for step in range(spec.ops):
            run: PrivateRun | SharedRun = private if chooser.random() < 0.5 else shared
            name, args = run.generate()
            history.append(f"{step}: {run.label} {describe(name, args)}")
            counts[f"{run.label} {name}: {run.apply(name, args)}"] += 1
            if step % VERIFY_EVERY == VERIFY_EVERY - 1:
                private.verify_all()
        step = spec.ops
        private.verify_all()
        shared.op_stripe_pread(0, spec.stripe_size)
    except Exception as exc:
        failure = (
            f"worker {spec.index} (seed {spec.seed}) at step {step}: {type(exc).__name__}: {exc}\n"
            + "".join(traceback.format_exception(exc)[-6:])
            + "last steps:\n"
            + "\n".join(history)
            + f"\n(replay the private part alone: run_private(dir, {spec.seed * 2 + 1}, ops))"
        )
    finally:
        private.close()
        shared.close()
    return WorkerReport(spec.index, failure, counts, private.model.snapshot(), bytes(shared.stripe))


def _child(target: Callable[..., Any], args: tuple[Any, ...], conn: multiprocessing.connection.Connection) -> None:
    try:
        conn.send(("ok", target(*args)))
    except BaseException:
        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


def run_in_processes(
    calls: list[tuple[Callable[..., Any], tuple[Any, ...]]], timeout: float, mountpoint: str
) -> list[Any]:
    """Run each ``target(*args)`` in a forked process, all at once; their values, in order.

    Every wait has a deadline: a process that has not answered by then fails
    the caller. Every process still alive at the end is killed; one that a hung
    daemon keeps from dying (a request the kernel waits out uninterruptibly)
    is freed by aborting ``mountpoint``'s FUSE connection.
    """
    context = multiprocessing.get_context("fork")
    processes = []
    pipes = []
    try:
        for target, args in calls:
            receiver, sender = context.Pipe(duplex=False)
            process = context.Process(target=_child, args=(target, args, sender), daemon=True)
            process.start()
            sender.close()
            processes.append(process)
            pipes.append(receiver)
        deadline = time.monotonic() + timeout
        results = []
        for i, (process, pipe) in enumerate(zip(processes, pipes, strict=True)):
            if not pipe.poll(max(0.0, deadline - time.monotonic())):
                raise AssertionError(f"process {i} did not finish within {timeout:.0f} s: the mount hangs")
            try:
                kind, value = pipe.recv()
            except EOFError:
                process.join(10)
                raise AssertionError(f"process {i} died without an answer (exit code {process.exitcode})") from None
            if kind != "ok":
                raise AssertionError(f"process {i} crashed:\n{value}")
            results.append(value)
        for process in processes:
            process.join(max(1.0, deadline - time.monotonic()))
        return results
    finally:
        alive = [p for p in processes if p.is_alive()]
        for process in alive:
            process.kill()
        for process in alive:
            process.join(10)
        if any(p.is_alive() for p in alive):
            abort_connection(mountpoint)
            for process in alive:
                process.join(10)
        for pipe in pipes:
            pipe.close()


def abort_connection(mountpoint: str) -> None:
    """Abort the FUSE connection of ``mountpoint``: every request waiting on its daemon fails (ENOTCONN)."""
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4] == mountpoint:
                device = fields[2].split(":")
                connection = os.makedev(int(device[0]), int(device[1]))
                Path(f"/sys/fs/fuse/connections/{connection}/abort").write_text("1")
                return


# == volumes ========================================================================================


@contextlib.contextmanager
def stress_volume(directory: Path, stack: str) -> Iterator[MountedVolume]:
    """A fresh 512 MiB volume with ``stack`` for the ``with`` body.

    After a body that succeeded: the daemon is alive and logged no error and
    no filter bug, and after the unmount, e2fsck finds the image clean.
    """
    filters, attached = _STACKS[stack]
    with mounted_volume(directory, size="512M", filters=filters) as vol:
        for name, instance, altitude in attached:
            _fltmc("attach", name, vol.mountpoint, "-i", instance, "-a", altitude)
        yield vol
        os.kill(vol.pid, 0)  # raises if the daemon died
        bad = [
            line for line in vol.log_text().splitlines() if re.search(r" (ERROR|CRITICAL) |Traceback|filter bug", line)
        ]
        assert not bad, "the daemon logged errors:\n" + "\n".join(bad[:30])
    fsck = subprocess.run(["e2fsck", "-fn", vol.image], capture_output=True, text=True, timeout=300)
    assert fsck.returncode == 0, f"e2fsck -fn found problems (exit {fsck.returncode}):\n{fsck.stdout}{fsck.stderr}"


def _process_timeout(ops: int) -> float:
    """How long processes running ``ops`` operations each may take: far more than they need (a hang, not slowness)."""
    return 60 + 0.05 * ops


# == the tests =======================================================================================


def test_the_private_model_is_ext4s(tmp_path: Path) -> None:
    """The private model predicts ext4 itself exactly (else a failure on the mount could be the model's),
    and its sequences make every operation succeed and fail."""
    os.umask(UMASK)
    counts: collections.Counter[str] = collections.Counter()
    for seed in range(3):
        root = tmp_path / str(seed)
        root.mkdir()
        counts += run_private(str(root), _ENV_SEED + seed, 4000)
    kinds = {n[3:] for n in dir(PrivateRun) if n.startswith("op_")}
    assert {key.split(":")[0] for key in counts if key.endswith(": ok")} == kinds
    failing = {key.split(":")[0] for key in counts if not key.endswith(": ok")}
    assert failing == {k for k in kinds if not k.startswith("slot_") or k == "slot_open"}


@pytest.mark.parametrize("stack", STRESS_STACKS)
def test_concurrent_stress(stack: str, tmp_path: Path) -> None:
    """Workers race on a fresh volume; every answer, the trees, the stripes and e2fsck stay right (module doc)."""
    workers, ops = _ENV_WORKERS, _ENV_OPS
    stripe_size = 3 * mmap.PAGESIZE + 1001  # not page aligned: neighbours share pages
    with stress_volume(tmp_path, stack) as vol:
        mnt, backing = Path(vol.mountpoint), Path(vol.backing)
        shared = mnt / "shared"
        shared.mkdir()
        for name in FILLERS:
            (shared / name).write_bytes(name.encode())
        with open(shared / STRIPES, "wb") as f:
            f.truncate(workers * stripe_size)
        specs = [
            WorkerSpec(
                k, _ENV_SEED + 1000 * k, ops, str(mnt / "private" / str(k)), str(shared), k * stripe_size, stripe_size
            )
            for k in range(workers)
        ]
        for spec in specs:
            os.makedirs(spec.private)
        reports: list[WorkerReport] = run_in_processes(
            [(stress_worker, (spec,)) for spec in specs], _process_timeout(ops), vol.mountpoint
        )
        failures = [r.failure for r in reports if r.failure]
        assert not failures, f"{len(failures)} of {workers} workers failed on the {stack} stack:\n\n" + "\n\n".join(
            failures
        )
        if ops >= DEFAULT_OPS:  # (a shorter run need not reach every operation)
            ran = {key.split(":")[0] for r in reports for key in r.counts if key.endswith(": ok")}
            kinds = {f"{run.label} {n[3:]}" for run in (PrivateRun, SharedRun) for n in dir(run) if n.startswith("op_")}
            assert kinds <= ran, f"operations never succeeded: {sorted(kinds - ran)}"

        stripes = b"".join(r.stripe for r in reports)
        assert (shared / STRIPES).read_bytes() == stripes, "the striped file through the mount lost writes"
        assert (backing / "shared" / STRIPES).read_bytes() == stripes, "the striped file on ext4 lost writes"
        for report, spec in zip(reports, specs, strict=True):
            on_ext4 = snapshot_tree(str(backing / Path(spec.private).relative_to(mnt)))
            assert on_ext4 == report.model, f"worker {report.index}'s private tree on ext4 differs from its model"

        no_slots = [None] * SLOTS
        through_mount, on_ext4 = (
            tree_state(Side(mnt, str(backing), list(no_slots))),
            tree_state(Side(backing, str(backing), list(no_slots))),
        )
        assert through_mount == on_ext4, "the tree through the mount differs from the tree on ext4"
        wrong = attribute_mismatches(mnt, str(backing))
        assert not wrong, "the mount reports attributes ext4 does not have:\n" + "\n".join(wrong[:20])


def _link_churn(source: str, link: str, rounds: int) -> int:
    """link(2) ``source`` to ``link`` and unlink ``link``, ``rounds`` times; how many links failed with ENOENT.

    Such a failure is the kernel's, not the daemon's (it never sees the LINK): the kernel applies the
    attributes of a LINK reply without checking whether a newer reply already updated the inode, so
    two links of one file at once can leave its cached link count low, and unlinks then take it to 0,
    which vfs_link refuses with ENOENT.
    """
    refused = 0
    for _ in range(rounds):
        try:
            os.link(source, link)
        except FileNotFoundError:
            refused += 1
            continue
        os.unlink(link)
    return refused


def test_a_link_racing_an_unlink_elsewhere_does_not_hang(tmp_path: Path) -> None:
    """A link of a file races an unlink of another of its names, in another directory: both finish.

    The daemon used to drop the file's names in other directories from the kernel's cache before
    answering LINK. Dropping a name takes its directory's lock, which an unlink there held while it
    waited for the file's lock, which the kernel holds until LINK is answered: the daemon and every
    caller on those directories hung for good (the stress test found it).
    """
    with stress_volume(tmp_path, "empty") as vol:
        mnt = Path(vol.mountpoint)
        (mnt / "d1").mkdir()
        (mnt / "d2").mkdir()
        source = mnt / "d1" / "a"
        source.write_bytes(b"linked")
        calls = [(_link_churn, (str(source), str(mnt / d / n), 2000)) for d, n in (("d2", "x"), ("d1", "b"))]
        run_in_processes(calls, 60, vol.mountpoint)
        assert os.lstat(source).st_nlink == os.lstat(Path(vol.backing) / "d1" / "a").st_nlink == 1


# == fsx ==============================================================================================

FSX_MAX_SIZE = (1 << 20) + 12_345


def _fsx_length(rng: random.Random) -> int:
    """Mostly small, sometimes page sized, now and then up to 1 MiB."""
    pick = rng.random()
    if pick < 0.6:
        return rng.randint(1, 8192)
    if pick < 0.95:
        return rng.randint(1, 128 * 1024)
    return rng.randint(1, 1 << 20)


def _fsx_offset(rng: random.Random, size: int) -> int:
    pick = rng.random()
    if pick < 0.5:
        return rng.randint(0, size)
    if pick < 0.8:
        return rng.randint(0, FSX_MAX_SIZE)
    return min(FSX_MAX_SIZE, max(0, rng.randint(0, FSX_MAX_SIZE // mmap.PAGESIZE) * mmap.PAGESIZE + rng.randint(-2, 2)))


class Fsx:
    """One file, its descriptors (read-write, append-only, read-only) and the bytearray it must equal."""

    def __init__(self, path: str, seed: int):
        self.path = path
        self.rng = random.Random(seed)
        self.model = bytearray()
        self.fds: dict[str, int] = {}
        self.open(os.O_CREAT | os.O_EXCL)

    def open(self, extra: int = 0) -> None:
        self.fds = {
            "rw": os.open(self.path, os.O_RDWR | extra, 0o644),
            "append": os.open(self.path, os.O_WRONLY | os.O_APPEND),
            "ro": os.open(self.path, os.O_RDONLY),
        }

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds = {}

    def check(self, what: str, actual: bytes, offset: int, length: int) -> None:
        """``actual``, read at ``offset`` asking for ``length`` bytes, must be what the model holds there."""
        expected = bytes(self.model[offset : offset + length])
        if actual != expected:
            raise _difference(f"{what} of {length} (file size {len(self.model)})", actual, expected, offset)

    def generate(self) -> tuple[str, tuple[Any, ...]]:
        rng, size = self.rng, len(self.model)
        offset, length = _fsx_offset(rng, size), _fsx_length(rng)
        length = max(1, min(length, FSX_MAX_SIZE - offset))
        choices: list[tuple[int, Callable[[], tuple[str, tuple[Any, ...]]]]] = [
            (10, lambda: ("pread", (rng.choice(("rw", "ro")), offset, length))),
            (4, lambda: ("read", (offset, length))),
            (10, lambda: ("pwrite", (offset, length))),
            (4, lambda: ("write", (offset, length))),
            (3, lambda: ("append", (min(length, max(1, FSX_MAX_SIZE - size)),))),
            (3, lambda: ("ftruncate", (rng.randint(0, FSX_MAX_SIZE),))),
            (2, lambda: ("truncate", (rng.randint(0, FSX_MAX_SIZE),))),
            (6, lambda: ("mmap_write", (offset, length, rng.random() < 0.5))),
            (5, lambda: ("mmap_read", (offset, length))),
            (3, lambda: ("copy_range", (rng.randint(0, size), offset, length))),
            (1, lambda: ("fsync", (rng.random() < 0.5,))),
            (1, lambda: ("reopen", ())),
        ]
        return _pick(rng, choices)  # type: ignore[no-any-return]

    def apply(self, name: str, args: tuple[Any, ...]) -> None:
        getattr(self, "op_" + name)(*args)
        size = os.fstat(self.fds["rw"]).st_size
        if size != len(self.model):
            raise ModelMismatch(f"the size is {size} after {name}, the model has {len(self.model)}")

    def op_pread(self, which: str, offset: int, length: int) -> None:
        self.check(f"pread through {which}", os.pread(self.fds[which], length, offset), offset, length)

    def op_read(self, offset: int, length: int) -> None:
        fd = self.fds["ro"]
        os.lseek(fd, offset, os.SEEK_SET)
        self.check("read", os.read(fd, length), offset, length)

    def op_pwrite(self, offset: int, length: int) -> None:
        data = self.rng.randbytes(length)
        if os.pwrite(self.fds["rw"], data, offset) != length:
            raise ModelMismatch("a short pwrite")
        _write_at(self.model, offset, data)

    def op_write(self, offset: int, length: int) -> None:
        data = self.rng.randbytes(length)
        fd = self.fds["rw"]
        os.lseek(fd, offset, os.SEEK_SET)
        if os.write(fd, data) != length or os.lseek(fd, 0, os.SEEK_CUR) != offset + length:
            raise ModelMismatch("a short write, or the offset did not move past it")
        _write_at(self.model, offset, data)

    def op_append(self, length: int) -> None:
        data = self.rng.randbytes(length)
        if os.write(self.fds["append"], data) != length:
            raise ModelMismatch("a short append")
        _write_at(self.model, len(self.model), data)

    def op_ftruncate(self, size: int) -> None:
        os.ftruncate(self.fds["rw"], size)
        _resize(self.model, size)

    def op_truncate(self, size: int) -> None:
        os.truncate(self.path, size)
        _resize(self.model, size)

    def op_mmap_write(self, offset: int, length: int, sync: bool) -> None:
        size = len(self.model)
        if size == 0:
            return
        start = offset % size
        data = self.rng.randbytes(min(length, size - start))
        with mmap.mmap(self.fds["rw"], size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE) as m:
            m[start : start + len(data)] = data
            if sync:
                m.flush()
        _write_at(self.model, start, data)

    def op_mmap_read(self, offset: int, length: int) -> None:
        size = len(self.model)
        if size == 0:
            return
        start = offset % size
        with mmap.mmap(self.fds["ro"], size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ) as m:
            self.check("a mapping's read", m[start : start + length], start, length)

    def op_copy_range(self, source: int, target: int, length: int) -> None:
        """copy_file_range within the file; the ranges must not overlap (EINVAL), so such a pick copies nothing."""
        expected = max(0, min(length, len(self.model) - source))  # the kernel shortens the copy to the end first
        if source < target + expected and target < source + expected:
            return
        copied = os.copy_file_range(self.fds["rw"], self.fds["rw"], length, source, target)
        if copied != expected:
            raise ModelMismatch(f"copy_file_range copied {copied} bytes, the model {expected}")
        if copied:
            _write_at(self.model, target, bytes(self.model[source : source + copied]))

    def op_fsync(self, data_only: bool) -> None:
        (os.fdatasync if data_only else os.fsync)(self.fds["rw"])

    def op_reopen(self) -> None:
        self.close()
        self.open()

    def check_all(self) -> None:
        with open(self.path, "rb") as f:
            content = f.read()
        self.check("the whole file", content, 0, len(content) + 1)


def run_fsx(path: str, seed: int, ops: int) -> tuple[int, str, collections.Counter[str]]:
    """An fsx history on a new file at ``path``: its final size and sha256, and how often each operation ran."""
    fsx = Fsx(path, seed)
    history: collections.deque[str] = collections.deque(maxlen=30)
    counts: collections.Counter[str] = collections.Counter()
    try:
        for step in range(ops):
            name, args = fsx.generate()
            history.append(f"{step}: {describe(name, args)} (size before {len(fsx.model)})")
            try:
                fsx.apply(name, args)
                if step % FSX_CHECK_EVERY == FSX_CHECK_EVERY - 1:
                    fsx.check_all()
            except (ModelMismatch, OSError) as exc:
                raise ModelMismatch(
                    f"{type(exc).__name__}: {exc}\nfsx seed {seed}, step {step}; last steps:\n" + "\n".join(history)
                ) from exc
            counts[name] += 1
        fsx.check_all()
    finally:
        fsx.close()
    return len(fsx.model), hashlib.sha256(fsx.model).hexdigest(), counts


@pytest.mark.parametrize("stack", STRESS_STACKS)
def test_fsx(stack: str, tmp_path: Path) -> None:
    """Two fsx histories at once, each on its own file: every read, size and final content as modelled."""
    ops = _ENV_FSX_OPS
    with stress_volume(tmp_path, stack) as vol:
        names = [f"fsx{i}" for i in range(FSX_HISTORIES)]
        calls = [(run_fsx, (os.path.join(vol.mountpoint, name), _ENV_SEED + i, ops)) for i, name in enumerate(names)]
        results = run_in_processes(calls, _process_timeout(ops), vol.mountpoint)
        for name, (size, digest, counts) in zip(names, results, strict=True):
            if ops >= DEFAULT_FSX_OPS:
                assert len(counts) == len([n for n in dir(Fsx) if n.startswith("op_")]), f"some never ran: {counts}"
            content = (Path(vol.backing) / name).read_bytes()
            assert (len(content), hashlib.sha256(content).hexdigest()) == (size, digest), f"{name} on ext4 differs"
