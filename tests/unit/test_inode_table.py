"""The inode table: a bounded set of pinned descriptors, the rest reachable by file handle."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from fltfuse._backend.inode_table import ROOT_INODE, InodeTable


@pytest.fixture
def table(tmp_path: Path) -> Iterator[InodeTable]:
    root = os.open(tmp_path, os.O_PATH | os.O_DIRECTORY)
    mount = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    t = InodeTable(root, os.fstat(root).st_ino, mount, budget=64)
    yield t
    t.close()
    os.close(mount)


needs_handles = pytest.mark.skipif(
    os.geteuid() != 0, reason="re-opening by file handle needs CAP_DAC_READ_SEARCH (root)"
)


def look(table: InodeTable, tmp_path: Path, name: str) -> int:
    root = table.fd(ROOT_INODE)
    st = os.stat(name, dir_fd=root, follow_symlinks=False)
    return table.node_id(table.lookup(root, name.encode(), st).st_ino)


@needs_handles
def test_the_working_set_is_bounded_and_every_inode_stays_reachable(table: InodeTable, tmp_path: Path) -> None:
    inos = []
    for i in range(500):
        (tmp_path / f"f{i}").write_text(str(i))
        inos.append(look(table, tmp_path, f"f{i}"))
    assert len(table) == 501
    assert table.pinned <= table.budget + 1
    for i, ino in enumerate(inos):  # evicted ones come back through their handle
        assert os.fstat(table.fd(ino)).st_ino == ino
        assert Path(table.proc(ino)).read_text() == str(i)


@needs_handles
def test_renamed_inode_is_still_the_same_file(table: InodeTable, tmp_path: Path) -> None:
    (tmp_path / "a").write_text("A")
    ino = look(table, tmp_path, "a")
    for i in range(200):  # push it out of the pinned set
        (tmp_path / f"g{i}").write_text("")
        look(table, tmp_path, f"g{i}")
    (tmp_path / "sub").mkdir()
    os.rename(tmp_path / "a", tmp_path / "sub" / "b")
    assert Path(table.proc(ino)).read_text() == "A"


@needs_handles
def test_a_deleted_inode_is_stale_never_another_file(table: InodeTable, tmp_path: Path) -> None:
    (tmp_path / "victim").write_text("old")
    ino = look(table, tmp_path, "victim")
    for i in range(200):
        (tmp_path / f"g{i}").write_text("")
        look(table, tmp_path, f"g{i}")
    assert table.get(ino) is not None and table.get(ino).fd == -1  # type: ignore[union-attr]
    os.unlink(tmp_path / "victim")
    with pytest.raises(OSError) as info:
        table.fd(ino)
    assert info.value.errno == errno.ESTALE


def test_unlinked_open_inodes_are_never_unpinned(table: InodeTable, tmp_path: Path) -> None:
    (tmp_path / "open").write_text("still here")
    ino = look(table, tmp_path, "open")
    table.keep_pinned(ino)
    os.unlink(tmp_path / "open")
    for i in range(300):
        (tmp_path / f"g{i}").write_text("")
        look(table, tmp_path, f"g{i}")
    assert Path(table.proc(ino)).read_text() == "still here"


def test_forget_releases_at_zero(table: InodeTable, tmp_path: Path) -> None:
    (tmp_path / "f").write_text("")
    ino = look(table, tmp_path, "f")
    look(table, tmp_path, "f")
    table.forget(ino, 1)
    assert table.get(ino) is not None
    table.forget(ino, 1)
    assert table.get(ino) is None
    with pytest.raises(OSError):
        table.fd(ino)


@needs_handles
def test_make_room_unpins(table: InodeTable, tmp_path: Path) -> None:
    for i in range(40):
        (tmp_path / f"f{i}").write_text("")
        look(table, tmp_path, f"f{i}")
    before = table.pinned
    assert table.make_room(10) == 10
    assert table.pinned == before - 10


@pytest.mark.skipif(os.geteuid() == 0, reason="checks the unprivileged case")
def test_without_handles_every_inode_stays_pinned(table: InodeTable, tmp_path: Path) -> None:
    for i in range(200):
        (tmp_path / f"f{i}").write_text("")
        look(table, tmp_path, f"f{i}")
    assert table.pinned == 201


def test_where_handles_cannot_be_reopened_a_listed_entry_is_pinned(table: InodeTable, tmp_path: Path) -> None:
    table._handles_work = False  # an unprivileged daemon: open_by_handle_at would fail with EPERM
    (tmp_path / "listed").write_text("x")
    ino = os.stat(tmp_path / "listed").st_ino
    before = table.pinned
    assert table.reserve_listed(table.fd(ROOT_INODE), b"listed", ino)
    assert table.pinned == before + 1  # reachable later without a handle
    assert os.fstat(table.fd(ino)).st_ino == ino
    assert not table.reserve_listed(table.fd(ROOT_INODE), b"gone", ino + 1)
