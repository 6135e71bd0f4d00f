"""The inodes the kernel knows, with their lookup counts and a way to reach each one.

FUSE names files by node id, and pyfuse3 makes the node id the inode number
(``st_ino``). The kernel may send a request for any node id it holds a lookup
on, long after the name it came through was renamed or removed, so the table
must reach the *same* inode without a path:

* A **pinned** inode has an ``O_PATH`` descriptor. While it is pinned its
  number cannot be reused, renames and hard links need no bookkeeping, and an
  unlinked-but-open file stays reachable.
* Descriptors are limited (RLIMIT_NOFILE, which an unprivileged or
  capability-less root cannot raise), and the kernel may know hundreds of
  thousands of inodes (one listing of a big directory). So only the most
  recently used inodes stay pinned; the others keep a **file handle**
  (``name_to_handle_at``: inode number and generation) and are re-opened with
  ``open_by_handle_at`` when used. A handle of an inode that was deleted and
  whose number was reused answers ESTALE: never another file.
* Inodes whose link count is 0 (unlinked while open) cannot be re-opened by
  handle, so they are never unpinned; the backend pins a known inode before it
  removes a name of it.

Where the backing file system has no file handles, or the daemon may not
open them (``open_by_handle_at`` needs CAP_DAC_READ_SEARCH: an unprivileged
daemon serving a directory), every known inode stays pinned and the
descriptor limit bounds the working set; the daemon logs it.
"""

from __future__ import annotations

import errno
import logging
import os
from collections import OrderedDict

from . import _syscalls

log = logging.getLogger(__name__)

ROOT_INODE = 1
PIN_FLAGS = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC


def _handles_work(root_fd: int, mount_fd: int) -> bool:
    """Whether inodes can be re-opened by handle here (open_by_handle_at needs CAP_DAC_READ_SEARCH)."""
    try:
        handle = _syscalls.name_to_handle_at(root_fd, b"", _syscalls.AT_EMPTY_PATH)
        os.close(_syscalls.open_by_handle_at(mount_fd, handle, PIN_FLAGS))
    except OSError as exc:
        log.warning(
            "inodes cannot be re-opened by file handle here (%s): every inode the kernel knows stays pinned, "
            "so the descriptor limit bounds how many it may know",
            exc.strerror,
        )
        return False
    return True


class Inode:
    """One inode the kernel holds: pin descriptor (or -1), file handle (or None), lookups.

    ``links`` are the names (parent node id, name) the kernel reached a
    non-directory through, most recent first: where a name query starts.
    """

    __slots__ = ("fd", "handle", "links", "lookups")

    def __init__(self, fd: int, handle: bytes | None, lookups: int):
        self.fd = fd
        self.handle = handle
        self.lookups = lookups
        self.links: list[tuple[int, bytes]] | None = None


class InodeTable:
    """Node id -> inode, pinned within a descriptor budget, re-opened by handle beyond it."""

    def __init__(self, root_fd: int, root_ino: int, mount_fd: int, budget: int):
        self._root_ino = root_ino
        self._mount_fd = mount_fd  # open_by_handle_at needs a descriptor that is not O_PATH
        self.budget = max(budget, 64)
        self._nodes: dict[int, Inode] = {ROOT_INODE: Inode(root_fd, None, 1)}
        self._pinned: OrderedDict[int, Inode] = OrderedDict()  # least recently used first; root excluded
        self._handles_work = _handles_work(root_fd, mount_fd)

    def __len__(self) -> int:
        return len(self._nodes)

    @property
    def pinned(self) -> int:
        return len(self._pinned) + 1

    def node_id(self, st_ino: int) -> int:
        return ROOT_INODE if st_ino == self._root_ino else st_ino

    def get(self, ino: int) -> Inode | None:
        return self._nodes.get(ino)

    def fd(self, ino: int) -> int:
        """An O_PATH descriptor of ``ino``, valid until the next call that pins another inode."""
        node = self._nodes.get(ino)
        if node is None:
            raise OSError(errno.ESTALE, f"inode {ino} is not known")
        if node.fd >= 0:
            if ino != ROOT_INODE:
                self._pinned.move_to_end(ino)
            return node.fd
        assert node.handle is not None
        node.fd = _syscalls.open_by_handle_at(self._mount_fd, node.handle, PIN_FLAGS)
        self._pin(ino, node)
        return node.fd

    def proc(self, ino: int) -> str:
        """``/proc/self/fd/N`` for ``ino``: a path that reaches the inode itself, even a symlink."""
        return f"/proc/self/fd/{self.fd(ino)}"

    def lookup(self, dir_fd: int, name: bytes, st: os.stat_result) -> os.stat_result:
        """Count one kernel lookup of ``dir_fd/name`` (whose stat is ``st``); return its stat.

        The returned stat is of the object actually referenced, which differs
        from ``st`` only if the name was replaced in between.
        """
        ino = self.node_id(st.st_ino)
        node = self._nodes.get(ino)
        if node is not None:
            if node.fd < 0 and ino != ROOT_INODE:
                handle = _syscalls.name_to_handle_at(dir_fd, name, 0)
                if handle != node.handle:  # the old inode died and its number was reused
                    node.handle = handle
            node.lookups += 1
            return st
        fd = os.open(name, PIN_FLAGS, dir_fd=dir_fd)
        try:
            st = os.fstat(fd)  # the object we pinned, even if the name changed meanwhile
        except BaseException:
            os.close(fd)
            raise
        ino = self.node_id(st.st_ino)
        node = self._nodes.get(ino)
        if node is not None:
            os.close(fd)
            node.lookups += 1
            return st
        self._add_pinned(ino, fd)
        return st

    def reserve_listed(self, dir_fd: int, name: bytes, ino: int) -> bool:
        """Count one lookup of a listed entry without pinning it; False if the name no longer is ``ino``."""
        node = self._nodes.get(ino)
        if node is not None:
            node.lookups += 1
            return True
        handle = None
        if self._handles_work:
            try:
                handle = _syscalls.name_to_handle_at(dir_fd, name, 0)
            except FileNotFoundError:
                return False
            except OSError as exc:
                if exc.errno != errno.EOPNOTSUPP:
                    raise
        if handle is None:  # no handles here, or they cannot be opened again: pin it
            try:
                fd = os.open(name, PIN_FLAGS, dir_fd=dir_fd)
            except FileNotFoundError:
                return False
            if self.node_id(os.fstat(fd).st_ino) != ino:
                os.close(fd)
                return False
            self._add_pinned(ino, fd)
            return True
        found = _syscalls.handle_inode(handle)
        if found is not None and found != ino:
            return False
        self._nodes[ino] = Inode(-1, handle, 1)
        return True

    def record_link(self, ino: int, parent: int, name: bytes) -> None:
        """The kernel reached non-directory ``ino`` through ``parent/name`` (most recent first; at most 8 kept)."""
        node = self._nodes.get(ino)
        if node is None:
            return
        links = node.links
        link = (parent, name)
        if not links:
            node.links = [link]
        elif links[0] != link:
            if link in links:
                links.remove(link)
            links.insert(0, link)
            del links[8:]

    def drop_link(self, ino: int, parent: int, name: bytes) -> None:
        """``parent/name`` no longer names ``ino`` (unlinked, renamed or replaced)."""
        node = self._nodes.get(ino)
        if node is not None and node.links and (parent, name) in node.links:
            node.links.remove((parent, name))

    def links(self, ino: int) -> list[tuple[int, bytes]]:
        node = self._nodes.get(ino)
        return list(node.links) if node is not None and node.links else []

    def add_lookups(self, ino: int, count: int) -> bool:
        node = self._nodes.get(ino)
        if node is None:
            return False
        node.lookups += count
        return True

    def forget(self, ino: int, count: int) -> bool:
        """The kernel dropped ``count`` lookups of ``ino``; at zero the inode is released (returns True)."""
        if ino == ROOT_INODE:
            return False
        node = self._nodes.get(ino)
        if node is None:
            log.error("forget of unknown inode %d", ino)
            return False
        node.lookups -= count
        if node.lookups > 0:
            return False
        del self._nodes[ino]
        if node.fd >= 0:
            del self._pinned[ino]
            os.close(node.fd)
        return True

    def keep_pinned(self, ino: int) -> None:
        """Make sure ``ino`` is pinned before a name of it is removed (it may be open, or a cwd)."""
        if ino in self._nodes:
            self.fd(ino)

    def make_room(self, count: int) -> int:
        """Unpin up to ``count`` inodes (after EMFILE); return how many were unpinned."""
        before = len(self._pinned)
        self._evict(max(0, len(self._pinned) - count))
        return before - len(self._pinned)

    def close(self) -> None:
        for node in self._nodes.values():
            if node.fd >= 0:
                os.close(node.fd)
        self._nodes.clear()
        self._pinned.clear()

    def _add_pinned(self, ino: int, fd: int) -> None:
        """A newly known inode, pinned by ``fd``, with the one lookup that made it known."""
        node = Inode(fd, None, 1)
        self._nodes[ino] = node
        self._pin(ino, node)

    def _pin(self, ino: int, node: Inode) -> None:
        self._pinned[ino] = node
        if len(self._pinned) > self.budget:
            self._evict(self.budget - self.budget // 8)

    def _evict(self, target: int) -> None:
        """Unpin least recently used inodes until at most ``target`` stay pinned."""
        if not self._handles_work:
            return
        skipped: list[tuple[int, Inode]] = []
        while len(self._pinned) > target:
            ino, node = self._pinned.popitem(last=False)
            if os.fstat(node.fd).st_nlink == 0:
                skipped.append((ino, node))  # unlinked: no handle can reach it again
                continue
            if node.handle is None:
                try:
                    node.handle = _syscalls.name_to_handle_at(node.fd, b"", _syscalls.AT_EMPTY_PATH)
                except OSError as exc:
                    if exc.errno != errno.EOPNOTSUPP:
                        raise
                    log.warning("the backing file system has no file handles: every known inode stays pinned")
                    self._handles_work = False
                    skipped.append((ino, node))
                    break
            os.close(node.fd)
            node.fd = -1
        for ino, node in reversed(skipped):
            self._pinned[ino] = node
            self._pinned.move_to_end(ino, last=False)
