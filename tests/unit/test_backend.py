"""The passthrough backend driven in-process through the instance stack (no kernel mount)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from fltfuse import (
    CleanupParameters,
    CloseParameters,
    CreateDisposition,
    CreateParameters,
    DispositionParameters,
    EaMinor,
    FileInformationClass,
    FileType,
    FlushBuffersParameters,
    LinkParameters,
    LookupParameters,
    MajorFunction,
    NtStatus,
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
from fltfuse._backend import ROOT_INODE

from .conftest import Driver


async def create(driver: Driver, name: bytes, parent: int = ROOT_INODE, flags: int = os.O_RDWR) -> tuple[int, int]:
    p = CreateParameters(CreateDisposition.CREATE, FileType.REGULAR, flags, parent, name, 0o644, handle_requested=True)
    cbd = await driver.send(p, parent)
    assert cbd.io_status.status == NtStatus.SUCCESS, cbd
    assert p.attributes is not None and p.handle is not None
    return p.attributes.ino, p.handle


async def test_create_write_read_round_trip(driver: Driver) -> None:
    ino, fh = await create(driver, b"f")
    cbd = await driver.send(WriteParameters(0, b"hello world"), ino, fh)
    assert cbd.io_status.information == 11
    rp = ReadParameters(6, 100)
    cbd = await driver.send(rp, ino, fh)
    assert bytes(rp.data or b"") == b"world"
    assert cbd.io_status.information == 5
    assert (driver.root / "f").read_bytes() == b"hello world"
    assert cbd.iopb.major_function is MajorFunction.READ


async def test_sparse_write_past_4_gib_reads_zeros_in_the_hole(driver: Driver) -> None:
    ino, fh = await create(driver, b"sparse")
    offset = 5 * 1024**3
    await driver.send(WriteParameters(offset, b"end"), ino, fh)
    rp = ReadParameters(4096, 8)
    await driver.send(rp, ino, fh)
    assert bytes(rp.data or b"") == b"\0" * 8
    rp = ReadParameters(offset, 10)
    await driver.send(rp, ino, fh)
    assert bytes(rp.data or b"") == b"end"
    assert os.stat(driver.root / "sparse").st_size == offset + 3


async def test_open_with_o_trunc_overwrites(driver: Driver) -> None:
    (driver.root / "f").write_bytes(b"a long line of text")
    look = LookupParameters(ROOT_INODE, b"f")
    await driver.send(look)
    assert look.attributes is not None
    p = CreateParameters(CreateDisposition.OVERWRITE, FileType.REGULAR, os.O_WRONLY | os.O_TRUNC, handle_requested=True)
    cbd = await driver.send(p, look.attributes.ino)
    assert cbd.io_status.status is NtStatus.SUCCESS
    assert (driver.root / "f").read_bytes() == b""
    await driver.send(CloseParameters(), look.attributes.ino, p.handle)


async def test_missing_name_is_object_name_not_found(driver: Driver) -> None:
    cbd = await driver.send(LookupParameters(ROOT_INODE, b"nope"))
    assert cbd.io_status.status is NtStatus.OBJECT_NAME_NOT_FOUND


async def test_create_exclusive_collision(driver: Driver) -> None:
    await create(driver, b"f")
    p = CreateParameters(
        CreateDisposition.CREATE, FileType.REGULAR, os.O_RDWR, ROOT_INODE, b"f", 0o644, handle_requested=True
    )
    cbd = await driver.send(p)
    assert cbd.io_status.status is NtStatus.OBJECT_NAME_COLLISION
    assert p.handle is None


async def test_lookup_counts_pin_and_forget_unpins(driver: Driver) -> None:
    (driver.root / "a").write_text("x")
    base = driver.backend.known_inodes()
    p = LookupParameters(ROOT_INODE, b"a")
    await driver.send(p)
    await driver.send(LookupParameters(ROOT_INODE, b"a"))
    assert p.attributes is not None
    ino = p.attributes.ino
    assert ino == os.stat(driver.root / "a").st_ino
    assert driver.backend.known_inodes() == base + 1
    driver.backend.forget(ino, 1)
    assert driver.backend.known_inodes() == base + 1
    driver.backend.forget(ino, 1)
    assert driver.backend.known_inodes() == base
    cbd = await driver.send(QueryInformationParameters(), ino)
    assert cbd.io_status.status is NtStatus.FILE_INVALID  # ESTALE: the kernel forgot it


async def test_hard_links_share_one_pinned_inode(driver: Driver) -> None:
    ino, _fh = await create(driver, b"one")
    lp = LinkParameters(ROOT_INODE, b"two")
    await driver.send(lp, ino)
    assert lp.attributes is not None and lp.attributes.ino == ino and lp.attributes.nlink == 2
    look = LookupParameters(ROOT_INODE, b"two")
    await driver.send(look)
    assert look.attributes is not None and look.attributes.ino == ino


async def test_unlinked_open_file_stays_usable(driver: Driver) -> None:
    ino, fh = await create(driver, b"gone")
    await driver.send(DispositionParameters(ROOT_INODE, b"gone", False))
    assert not (driver.root / "gone").exists()
    await driver.send(WriteParameters(0, b"still here"), ino, fh)
    rp = ReadParameters(0, 64)
    await driver.send(rp, ino, fh)
    assert bytes(rp.data or b"") == b"still here"
    qp = QueryInformationParameters()
    await driver.send(qp, ino)
    assert qp.attributes is not None and qp.attributes.nlink == 0
    await driver.send(CleanupParameters(), ino, fh)
    cbd = await driver.send(CloseParameters(), ino, fh)
    assert cbd.io_status.status is NtStatus.SUCCESS


async def test_set_attributes_size_mode_and_times(driver: Driver) -> None:
    ino, _fh = await create(driver, b"f")
    p = SetAttributesParameters(FileInformationClass.END_OF_FILE, size=10_000)
    await driver.send(p, ino)
    assert p.attributes is not None and p.attributes.size == 10_000
    p = SetAttributesParameters(FileInformationClass.BASIC, mode=0o100600, mtime_ns=1_234_567_890_123_456_789)
    await driver.send(p, ino)
    st = os.stat(driver.root / "f")
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert st.st_mtime_ns == 1_234_567_890_123_456_789
    before_atime = st.st_atime_ns
    p = SetAttributesParameters(FileInformationClass.BASIC, mtime_ns=5_000_000_001)  # atime omitted: unchanged
    await driver.send(p, ino)
    st = os.stat(driver.root / "f")
    assert (st.st_atime_ns, st.st_mtime_ns) == (before_atime, 5_000_000_001)


async def test_rename_flags(driver: Driver) -> None:
    (driver.root / "a").write_text("A")
    (driver.root / "b").write_text("B")
    cbd = await driver.send(RenameParameters(ROOT_INODE, b"a", ROOT_INODE, b"b", 1))  # RENAME_NOREPLACE
    assert cbd.io_status.status is NtStatus.OBJECT_NAME_COLLISION
    await driver.send(RenameParameters(ROOT_INODE, b"a", ROOT_INODE, b"b", 2))  # RENAME_EXCHANGE
    assert (driver.root / "a").read_text() == "B" and (driver.root / "b").read_text() == "A"
    await driver.send(RenameParameters(ROOT_INODE, b"a", ROOT_INODE, b"b"))
    assert not (driver.root / "a").exists() and (driver.root / "b").read_text() == "B"


async def test_rmdir_of_non_empty_directory(driver: Driver) -> None:
    (driver.root / "d").mkdir()
    (driver.root / "d" / "x").write_text("")
    cbd = await driver.send(DispositionParameters(ROOT_INODE, b"d", True))
    assert cbd.io_status.status is NtStatus.DIRECTORY_NOT_EMPTY


async def test_special_files(driver: Driver) -> None:
    p = CreateParameters(CreateDisposition.CREATE, FileType.FIFO, 0, ROOT_INODE, b"fifo", 0o640)
    await driver.send(p)
    assert stat.S_ISFIFO(os.lstat(driver.root / "fifo").st_mode)
    p = CreateParameters(CreateDisposition.CREATE, FileType.SYMLINK, 0, ROOT_INODE, b"link", link_target=b"fifo")
    await driver.send(p)
    assert os.readlink(driver.root / "link") == "fifo"
    p = CreateParameters(CreateDisposition.CREATE, FileType.DIRECTORY, os.O_DIRECTORY, ROOT_INODE, b"dir", 0o750)
    await driver.send(p)
    assert stat.S_IMODE(os.stat(driver.root / "dir").st_mode) == 0o750


async def test_new_objects_belong_to_the_requestor(driver: Driver) -> None:
    if os.geteuid() != 0:
        pytest.skip("an unprivileged daemon creates everything as itself, like any process")
    someone = Requestor(1, 4321, 8765, 0o022)
    p = CreateParameters(CreateDisposition.CREATE, FileType.DIRECTORY, 0, ROOT_INODE, b"mine", 0o755)
    await driver.send(p, requestor=someone)
    st = os.stat(driver.root / "mine")
    assert (st.st_uid, st.st_gid) == (4321, 8765)
    os.chmod(driver.root / "mine", 0o2777)
    os.chown(driver.root / "mine", 0, 99)
    assert p.attributes is not None
    p2 = CreateParameters(
        CreateDisposition.CREATE, FileType.REGULAR, os.O_RDWR, p.attributes.ino, b"f", 0o644, handle_requested=True
    )
    await driver.send(p2, p.attributes.ino, requestor=someone)
    st = os.stat(driver.root / "mine" / "f")
    assert (st.st_uid, st.st_gid) == (4321, 99)  # a set-gid directory's group wins


async def test_directory_listing_resumes_at_offsets_without_skips_or_repeats(driver: Driver) -> None:
    names = {f"n{i:04d}".encode() for i in range(600)}
    for name in names:
        (driver.root / name.decode()).write_bytes(b"")
    fh = await driver.opendir()
    seen: list[bytes] = []
    offset = 0
    rounds = 0
    while entries := await driver.list_from(fh, offset):
        taken = entries[:7]  # the kernel takes only what fits its buffer
        seen.extend(entry.name for entry in taken)
        driver.take(fh, taken)
        offset = taken[-1].next_offset
        rounds += 1
        if rounds == 20:  # the directory changes during the listing
            (driver.root / "added-late").write_bytes(b"")
            os.unlink(driver.root / "n0000")
    listed = [n for n in seen if n not in (b".", b"..")]
    assert len(listed) == len(set(listed)), "an entry was listed twice"
    assert {b".", b".."} <= set(seen)
    missing = (names - {b"n0000"}) - set(listed)
    assert not missing, f"entries skipped: {sorted(missing)[:5]}"
    await driver.closedir(fh)


async def test_extended_attributes(driver: Driver) -> None:
    ino, _fh = await create(driver, b"f")
    await driver.send(SetEaParameters(EaMinor.SET, b"user.colour", b"blue"), ino)
    get = QueryEaParameters(EaMinor.GET, b"user.colour")
    await driver.send(get, ino)
    assert get.value == b"blue"
    names = QueryEaParameters(EaMinor.LIST)
    await driver.send(names, ino)
    assert names.names is not None and b"user.colour" in names.names
    await driver.send(SetEaParameters(EaMinor.REMOVE, b"user.colour"), ino)
    cbd = await driver.send(QueryEaParameters(EaMinor.GET, b"user.colour"), ino)
    assert cbd.io_status.status is NtStatus.NONEXISTENT_EA_ENTRY


async def test_statfs_is_the_backing_file_systems(driver: Driver) -> None:
    p = QueryVolumeInformationParameters()
    await driver.send(p)
    v = os.statvfs(driver.root)
    assert p.statistics is not None
    assert (p.statistics.block_size, p.statistics.blocks, p.statistics.name_max) == (v.f_bsize, v.f_blocks, v.f_namemax)


async def test_fsync_runs_and_succeeds(driver: Driver) -> None:
    ino, fh = await create(driver, b"f")
    await driver.send(WriteParameters(0, b"x" * 100_000), ino, fh)
    for datasync in (False, True):
        cbd = await driver.send(FlushBuffersParameters(datasync), ino, fh)
        assert cbd.io_status.status is NtStatus.SUCCESS


async def test_read_of_uncached_data_goes_to_a_thread_and_returns_everything(driver: Driver, tmp_path: Path) -> None:
    data = os.urandom(1 << 20)
    (tmp_path / "big").write_bytes(data)
    fd = os.open(tmp_path / "big", os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # drop it from the page cache
    os.close(fd)
    look = LookupParameters(ROOT_INODE, b"big")
    await driver.send(look)
    assert look.attributes is not None
    op = CreateParameters(CreateDisposition.OPEN, FileType.REGULAR, os.O_RDONLY, handle_requested=True)
    await driver.send(op, look.attributes.ino)
    rp = ReadParameters(0, 1 << 20)
    await driver.send(rp, look.attributes.ino, op.handle)
    assert bytes(rp.data or b"") == data
    cbd = await driver.send(ReadParameters(len(data) - 10, 4096), look.attributes.ino, op.handle)
    assert cbd.io_status.information == 10


async def test_errors_of_a_bad_handle_are_statuses_not_exceptions(driver: Driver) -> None:
    cbd = await driver.send(WriteParameters(0, b"x"), ROOT_INODE, 987654)
    assert cbd.io_status.status is NtStatus.INVALID_HANDLE


async def test_listing_counts_one_lookup_per_entry_taken(driver: Driver) -> None:
    for i in range(50):
        (driver.root / f"e{i}").write_bytes(b"")
    fh = await driver.opendir()
    base = driver.backend.known_inodes()
    children = [e for e in await driver.list_from(fh, 0) if e.name not in (b".", b"..")]
    driver.take(fh, children[:10])
    assert driver.backend.known_inodes() == base + 10  # the other 40 were released
    for e in children[:10]:
        driver.backend.forget(e.attributes.ino, 1)
    assert driver.backend.known_inodes() == base
    await driver.closedir(fh)


async def test_entries_removed_between_serves_are_left_out_not_errors(driver: Driver) -> None:
    for i in range(300):
        (driver.root / f"x{i:03d}").write_bytes(b"")
    fh = await driver.opendir()
    first = (await driver.list_from(fh, 0))[:5]
    driver.take(fh, first)
    for i in range(300):
        (driver.root / f"x{i:03d}").unlink(missing_ok=True)
    rest = await driver.list_from(fh, first[-1].next_offset)
    assert [e.name for e in rest if e.name not in (b".", b"..")] == []
    driver.take(fh, [])
    await driver.closedir(fh)


async def test_a_batch_whose_rest_was_deleted_does_not_end_the_listing(driver: Driver) -> None:
    """Regression: when every entry left in the cached batch is gone, serve the next batch, not EOF."""
    for i in range(1000):
        (driver.root / f"y{i:04d}").write_bytes(b"")
    fh = await driver.opendir()
    batch = await driver.list_from(fh, 0)
    first = batch[:3]
    driver.take(fh, first)
    for entry in batch[3:]:  # the whole rest of this batch disappears
        os.unlink(driver.root / entry.name.decode())
    seen = {e.name for e in first}
    offset = first[-1].next_offset
    while entries := await driver.list_from(fh, offset):
        seen.update(e.name for e in entries)
        driver.take(fh, entries)
        offset = entries[-1].next_offset
    left = {n.encode() for n in os.listdir(driver.root)}
    assert left <= seen, f"{len(left - seen)} entries never listed"
    await driver.closedir(fh)
