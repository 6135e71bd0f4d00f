"""The encryption filter in-process: what a caller sees is what a plain file gives; what the disk holds is not.

Each volume is an InProcessVolume over an empty backing directory with the encryption filter's instance
(altitude 142000) and its random key file in a KeyDirectory under tmp_path. The main test is differential:
a long seeded sequence of pwrite, pread and truncates through the volume and with os.* on plain files,
compared at every step, while the backing files are checked to hold ciphertext of the right size.
Two probe filters frame the filter where a test needs to see the buffers it swaps.
"""

from __future__ import annotations

import errno
import logging
import os
import random
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pyfuse3
import pytest

from filters.encryption.keys import RECORD_NAME
from filters.encryption.layout import BLOCK_SIZE, MAGIC, RECORD_SIZE, cipher_size, record_offset
from fltfuse import (
    CallbackData,
    Filter,
    FilterRegistration,
    MajorFunction,
    NtStatus,
    OperationRegistration,
    PostopCallbackStatus,
    PostopFlags,
    PreopCallbackStatus,
    ReadParameters,
    WriteParameters,
)
from fltfuse._stack import Instance, StackError
from fltfuse.testing import InProcessVolume

MARK = b"<PLAINTEXT-MARKER>"
BOUNDARIES = (0, 1, 27, 28, 511, 512, 4095, 4096, 4097, 8191, 8192, 8193, 12287, 12288, 12289, 16384)
FAR = 10 * 1024 * 1024  # past everything else: the file becomes sparse


def marked(length: int, seed: int) -> bytes:
    """``length`` bytes of plaintext that is easy to find on disk: the marker, with a seeded tail after each."""
    rng = random.Random(seed)
    out = bytearray()
    while len(out) < length:
        out += MARK + rng.randbytes(rng.randrange(0, 40))
    return bytes(out[:length])


class Probe:
    """A test filter that keeps the data of every READ (in its post) and WRITE (in its pre) it sees."""

    def __init__(self, name: str):
        self.reads: list[tuple[int, bytes]] = []  # (offset asked for, data returned)
        self.writes: list[tuple[int, bytes]] = []  # (offset, data going down)
        operations = (
            OperationRegistration(MajorFunction.READ, self.pre, self.post_read),
            OperationRegistration(MajorFunction.WRITE, self.pre_write, None),
        )
        self.filter = Filter(name, FilterRegistration(operations=operations))

    def pre(self, cbd: CallbackData, objects: Any) -> PreopCallbackStatus:
        return PreopCallbackStatus.SUCCESS_WITH_CALLBACK

    def post_read(self, cbd: CallbackData, objects: Any, context: Any, flags: PostopFlags) -> PostopCallbackStatus:
        p = cbd.iopb.parameters
        assert isinstance(p, ReadParameters)
        self.reads.append((p.offset, bytes(p.data or b"")))
        return PostopCallbackStatus.FINISHED_PROCESSING

    def pre_write(self, cbd: CallbackData, objects: Any) -> PreopCallbackStatus:
        p = cbd.iopb.parameters
        assert isinstance(p, WriteParameters)
        self.writes.append((p.offset, bytes(p.data)))
        return PreopCallbackStatus.SUCCESS_NO_CALLBACK


@dataclass
class Volumes:
    """Makes volumes over ``tmp_path/vol`` with the filter's keys in ``tmp_path/keys``."""

    tmp_path: Path
    opened: list[InProcessVolume] = field(default_factory=list)

    @property
    def backing(self) -> Path:
        return self.tmp_path / "vol"

    @property
    def keys(self) -> Path:
        return self.tmp_path / "keys"

    def open(self, *extra: Any, **parameters: str) -> InProcessVolume:
        """A volume with the encryption filter (parameters: its INF parameters, KeyDirectory by default) and
        ``extra`` filters (``(Filter, altitude)``)."""
        parameters.setdefault("KeyDirectory", str(self.keys))
        self.backing.mkdir(exist_ok=True)
        vol = InProcessVolume(self.backing, ["encryption", *extra], parameters={"encryption": parameters})
        self.opened.append(vol)
        return vol

    async def close(self, vol: InProcessVolume) -> None:
        self.opened.remove(vol)
        await vol.aclose()


@pytest.fixture
def volumes(tmp_path: Path) -> Iterator[Volumes]:
    made = Volumes(tmp_path)
    yield made
    for vol in made.opened:
        vol.close()


def instance_of(vol: InProcessVolume) -> Instance:
    [instance] = [i for i in vol.stack.instances if i.filter.name == "encryption"]
    return instance


async def ftruncate(vol: InProcessVolume, handle: int, size: int) -> None:
    """ftruncate(2): the SETATTR the kernel sends with the handle (InProcessVolume.truncate goes by path)."""
    attr = pyfuse3.EntryAttributes()
    attr.st_size = size
    fields = SimpleNamespace(
        update_size=True,
        update_mode=False,
        update_uid=False,
        update_gid=False,
        update_atime=False,
        update_mtime=False,
        update_ctime=False,
    )
    await vol._call("", "setattr", 0, attr, fields, handle, vol._caller)


# -- the differential test -----------------------------------------------------------------------------


class Differential:
    """Files opened both through the volume and with os.* in a plain directory, changed and compared alike.

    Each file has two handles through the volume, used in turn at random (they share the filter's stream
    context and its own handle on the file), and one file descriptor on the plain file.
    O_APPEND is not exercised: on a mount the kernel turns an appending write into a write at the size it
    knows, so the filter never sees append semantics, and in-process there is no kernel to do it.
    """

    def __init__(self, vol: InProcessVolume, backing: Path, plain: Path, names: list[str]):
        self.vol, self.backing, self.plain, self.names = vol, backing, plain, names
        self.handles: dict[str, list[int]] = {}
        self.fds: dict[str, int] = {}
        kinds = ("write", "read", "ftruncate", "truncate", "reopen one", "reopen all", "O_TRUNC")
        self.counts: dict[str, int] = dict.fromkeys(kinds, 0)
        self.largest = 0  # the largest size a file had

    async def open(self, name: str) -> None:
        self.handles[name] = [await self.vol.open(name, os.O_RDWR | os.O_CREAT) for _ in range(2)]
        self.fds[name] = os.open(self.plain / name, os.O_RDWR | os.O_CREAT, 0o644)

    async def close(self, name: str) -> None:
        for handle in self.handles.pop(name):
            await self.vol.close_handle(handle)
        os.close(self.fds.pop(name))

    async def reopen(self, name: str, which: int, flags: int = 0) -> None:
        """Close one of the file's handles and open it again (with O_TRUNC: as an empty file)."""
        handles = self.handles[name]
        await self.vol.close_handle(handles[which])
        handles[which] = await self.vol.open(name, os.O_RDWR | flags)
        if flags & os.O_TRUNC:
            os.ftruncate(self.fds[name], 0)

    def size(self, name: str) -> int:
        return os.fstat(self.fds[name]).st_size

    async def compare_sizes(self, name: str, step: int) -> None:
        size = self.size(name)
        self.largest = max(self.largest, size)
        assert (await self.vol.stat(name)).st_size == size, (step, name)
        assert (self.backing / name).stat().st_size == cipher_size(size), (step, name)

    def offset(self, rng: random.Random, name: str) -> int:
        roll = rng.random()
        if roll < 0.4:
            return max(0, rng.choice(BOUNDARIES) + rng.choice((-1, 0, 0, 0, 1)))
        if roll < 0.75:
            return rng.randrange(64 * 1024)
        if roll < 0.97:
            return max(0, self.size(name) + rng.randrange(-BLOCK_SIZE, BLOCK_SIZE))
        return FAR + rng.randrange(-2 * BLOCK_SIZE, 2 * BLOCK_SIZE)

    @staticmethod
    def length(rng: random.Random) -> int:
        if rng.random() < 0.5:
            return rng.choice((1, 2, 28, 29, 511, 512, 4095, 4096, 4097, 8192, 8193))
        return rng.randrange(1, 12_000)

    async def step(self, rng: random.Random, step: int) -> None:
        name = rng.choice(self.names)
        which = rng.randrange(2)
        handle, fd = self.handles[name][which], self.fds[name]
        roll = rng.random()
        if roll < 0.45:
            self.counts["write"] += 1
            offset, length = self.offset(rng, name), self.length(rng)
            data = marked(length, step) if rng.random() < 0.5 else rng.randbytes(length)
            assert await self.vol.write(handle, offset, data) == os.pwrite(fd, data, offset) == length, step
        elif roll < 0.85:
            self.counts["read"] += 1
            offset, length = self.offset(rng, name), rng.choice((1, 4096, rng.randrange(1, 20_000)))
            assert await self.vol.read(handle, offset, length) == os.pread(fd, length, offset), (step, offset, length)
        elif roll < 0.92:
            size = self.offset(rng, name) if rng.random() < 0.9 else 0
            if rng.random() < 0.5:
                self.counts["ftruncate"] += 1
                await ftruncate(self.vol, handle, size)
                os.ftruncate(fd, size)
            else:
                self.counts["truncate"] += 1
                assert await self.vol.truncate(name, size) == size, step
                os.truncate(self.plain / name, size)
        elif roll < 0.95:
            self.counts["reopen one"] += 1
            await self.reopen(name, which)
        elif roll < 0.97:
            self.counts["reopen all"] += 1  # the last handle closes: so does the filter's own
            await self.close(name)
            await self.open(name)
        else:
            self.counts["O_TRUNC"] += 1
            await self.reopen(name, which, os.O_TRUNC)
        await self.compare_sizes(name, step)

    def assert_no_plaintext_on_disk(self) -> None:
        for name in self.names:
            on_disk = (self.backing / name).read_bytes()
            assert MARK not in on_disk, name
            assert not on_disk or on_disk.startswith(MAGIC), name


async def test_a_seeded_random_sequence_gives_what_plain_files_give(volumes: Volumes, tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    plain.mkdir()
    vol = volumes.open()
    names = ["a", "b", "c"]
    run = Differential(vol, volumes.backing, plain, names)
    for name in names:
        await run.open(name)
    rng = random.Random(20261122)
    for step in range(5000):
        await run.step(rng, step)
        if step % 500 == 499:
            run.assert_no_plaintext_on_disk()
    assert min(run.counts.values()) >= 20, run.counts  # every kind of step was taken, often
    assert run.largest > FAR - 2 * BLOCK_SIZE  # and files went sparse
    for name in names:
        await run.close(name)
        assert await vol.read_file(name) == (plain / name).read_bytes(), name
    run.assert_no_plaintext_on_disk()
    await volumes.close(vol)

    again = volumes.open()  # a second volume over the same directory with the same key directory
    for name in names:
        assert await again.read_file(name) == (plain / name).read_bytes(), name
        assert (await again.stat(name)).st_size == (plain / name).stat().st_size
    assert sorted(await again.listdir()) == names


@pytest.mark.parametrize("size", [1, 27, 28, 29, 4095, 4096, 4097, 3 * 4096, 3 * 4096 + 50, 70_000])
async def test_the_backing_file_holds_ciphertext_of_the_size_its_plaintext_needs(volumes: Volumes, size: int) -> None:
    vol = volumes.open()
    data = marked(size, size)
    await vol.write_file("f", data)
    on_disk = (volumes.backing / "f").read_bytes()
    assert len(on_disk) == cipher_size(size) and on_disk.startswith(MAGIC)
    assert len(data) < 8 or data[:16] not in on_disk  # (a shorter plaintext may occur in ciphertext by chance)
    assert (await vol.stat("f")).st_size == size
    assert await vol.read_file("f") == data
    await vol.write_file("f", b"")  # O_TRUNC to empty: empty on disk too, no header
    assert (volumes.backing / "f").stat().st_size == 0 and (await vol.stat("f")).st_size == 0


async def test_a_sparse_file_stays_sparse_and_its_holes_read_as_zeros(volumes: Volumes) -> None:
    vol = volumes.open()
    handle = await vol.open("sparse", os.O_RDWR | os.O_CREAT)
    assert await vol.write(handle, FAR, b"end") == 3
    assert await vol.read(handle, FAR - 5, 10) == bytes(5) + b"end"
    assert await vol.read(handle, 4096 * 7 + 5, 9000) == bytes(9000)
    await vol.close_handle(handle)
    st = (volumes.backing / "sparse").stat()
    assert st.st_size == cipher_size(FAR + 3)
    assert st.st_blocks * 512 < 64 * 1024  # the header and the last records, not 10 MiB of records


async def test_truncate_by_path_with_no_handle_open(volumes: Volumes, tmp_path: Path) -> None:
    """truncate(2) of a file nobody has open: the filter opens its own handle for it and closes it after."""
    vol = volumes.open()
    plain = tmp_path / "plain"
    data = marked(3 * BLOCK_SIZE + 100, 9)
    await vol.write_file("f", data)
    plain.write_bytes(data)
    for size in (2 * BLOCK_SIZE + 7, 2 * BLOCK_SIZE + 7, 5 * BLOCK_SIZE + 1, BLOCK_SIZE, 3, 0, 9000):
        assert await vol.truncate("f", size) == size
        os.truncate(plain, size)
        assert await vol.read_file("f") == plain.read_bytes(), size
        assert (volumes.backing / "f").stat().st_size == cipher_size(size)
    await volumes.close(vol)  # (the verifier fails the close if a stream context is left referenced)


async def test_a_file_created_read_only_takes_writes_through_the_handle_that_created_it(
    volumes: Volumes, tmp_path: Path
) -> None:
    """open(O_CREAT | O_WRONLY, 0444) gives a writable handle on a file no one may open for writing later."""
    vol = volumes.open()
    handle = await vol.open("f", os.O_WRONLY | os.O_CREAT, 0o444)
    fd = os.open(tmp_path / "plain", os.O_WRONLY | os.O_CREAT, 0o444)
    try:
        for offset, data in ((5000, b"x" * 10), (100, b"y" * 10), (9000, b"z" * 5)):
            assert await vol.write(handle, offset, data) == os.pwrite(fd, data, offset)
    finally:
        await vol.close_handle(handle)
        os.close(fd)
    assert await vol.read_file("f") == (tmp_path / "plain").read_bytes()


# -- damaged data --------------------------------------------------------------------------------------


def flip(path: Path, at: int) -> None:
    with path.open("r+b") as f:
        f.seek(at)
        byte = f.read(1)[0]
        f.seek(at)
        f.write(bytes([byte ^ 0x10]))


THREE_BLOCKS = 2 * BLOCK_SIZE + 1000  # two full records and a short one


@pytest.mark.parametrize(
    ("at", "damaged"),
    [
        (record_offset(0) + 3, 0),  # in record 0's nonce
        (record_offset(1) + 2000, 1),  # in record 1's ciphertext
        (record_offset(2) + 12 + 1000 + 5, 2),  # in the short last record's tag
    ],
)
async def test_a_flipped_byte_fails_the_read_of_its_block_with_eio_and_a_log_line(
    volumes: Volumes, caplog: pytest.LogCaptureFixture, at: int, damaged: int
) -> None:
    vol = volumes.open()
    data = random.Random(at).randbytes(THREE_BLOCKS)
    await vol.write_file("f", data)
    ino = (volumes.backing / "f").stat().st_ino
    flip(volumes.backing / "f", at)
    handle = await vol.open("f")
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="fltfuse.filters.encryption"):
        for block in range(3):
            start = block * BLOCK_SIZE
            if block == damaged:
                with pytest.raises(OSError) as raised:
                    await vol.read(handle, start + 10, 100)
                assert raised.value.errno == errno.EIO
            else:
                assert await vol.read(handle, start, BLOCK_SIZE) == data[start : start + BLOCK_SIZE]
        with pytest.raises(OSError) as raised:  # a read that spans the damaged block fails as a whole
            await vol.read(handle, 0, len(data))
        assert raised.value.errno == errno.EIO
    await vol.close_handle(handle)
    lines = [r.getMessage() for r in caplog.records if r.name == "fltfuse.filters.encryption"]
    expected = f"encryption: inode {ino}: block {damaged} failed its authentication check"
    assert len(lines) == 2 and all(line.startswith(expected) for line in lines), lines


async def test_damage_is_found_by_a_volume_that_never_saw_the_file(
    volumes: Volumes, caplog: pytest.LogCaptureFixture
) -> None:
    """A fresh volume learns the file id from the header: a changed file id fails every block, a changed
    magic makes the file not one of ours (EIO too), and a record moved to another block fails there."""
    vol = volumes.open()
    data = random.Random(1).randbytes(THREE_BLOCKS)
    for name in ("id", "magic", "moved"):
        await vol.write_file(name, data)
    await volumes.close(vol)
    flip(volumes.backing / "id", len(MAGIC) + 4)
    flip(volumes.backing / "magic", 2)
    with (volumes.backing / "moved").open("r+b") as f:  # record 0 copied over record 1
        record = os.pread(f.fileno(), RECORD_SIZE, record_offset(0))
        os.pwrite(f.fileno(), record, record_offset(1))

    vol = volumes.open()
    with caplog.at_level(logging.ERROR, logger="fltfuse.filters.encryption"):
        handle = await vol.open("moved")
        assert await vol.read(handle, 0, BLOCK_SIZE) == data[:BLOCK_SIZE]
        assert await read_errno(vol, handle, BLOCK_SIZE) == errno.EIO
        assert await vol.read(handle, 2 * BLOCK_SIZE, BLOCK_SIZE) == data[2 * BLOCK_SIZE :]
        await vol.close_handle(handle)
        for name, offset in (("id", 0), ("id", 2 * BLOCK_SIZE), ("magic", 0), ("magic", BLOCK_SIZE)):
            handle = await vol.open(name)
            assert await read_errno(vol, handle, offset) == errno.EIO, (name, offset)
            await vol.close_handle(handle)
    text = caplog.text
    inode = {name: (volumes.backing / name).stat().st_ino for name in ("id", "magic", "moved")}
    assert f"inode {inode['moved']}: block 1 failed its authentication check" in text
    assert f"inode {inode['id']}: block 0 failed" in text and f"inode {inode['id']}: block 2 failed" in text
    assert f"inode {inode['magic']}: no encryption header" in text


async def read_errno(vol: InProcessVolume, handle: int, offset: int) -> int | None:
    try:
        await vol.read(handle, offset, 100)
    except OSError as exc:
        return exc.errno
    return None


# -- the volume record ---------------------------------------------------------------------------------


async def test_the_volume_record_is_out_of_reach_at_the_root(volumes: Volumes) -> None:
    vol = volumes.open()
    record = volumes.backing / RECORD_NAME
    content = record.read_bytes()
    await vol.write_file("f", b"data")
    assert await vol.listdir() == ["f"]
    absent: list[Callable[[], Awaitable[Any]]] = [
        lambda: vol.lookup(RECORD_NAME),
        lambda: vol.open(RECORD_NAME),
        lambda: vol.stat(RECORD_NAME),
        lambda: vol.unlink(RECORD_NAME),
    ]
    for request in absent:
        with pytest.raises(OSError) as raised:
            await request()
        assert raised.value.errno == errno.ENOENT
    refused: list[Callable[[], Awaitable[Any]]] = [
        lambda: vol.open(RECORD_NAME, os.O_WRONLY | os.O_CREAT),
        lambda: vol.open(RECORD_NAME + ".new", os.O_WRONLY | os.O_CREAT),  # nor the name it is written under
        lambda: vol.mkdir(RECORD_NAME),
        lambda: vol.rename("f", RECORD_NAME),
    ]
    for request in refused:
        with pytest.raises(OSError) as raised:
            await request()
        assert raised.value.errno == errno.EACCES
    assert record.read_bytes() == content
    assert sorted(os.listdir(volumes.backing)) == [RECORD_NAME, "f"]
    assert await vol.read_file("f") == b"data"
    # below the root the name is an ordinary one
    await vol.mkdir("sub")
    await vol.write_file(f"sub/{RECORD_NAME}", b"mine")
    assert await vol.listdir("sub") == [RECORD_NAME]
    await vol.rename(f"sub/{RECORD_NAME}", "sub/other")
    assert await vol.read_file("sub/other") == b"mine"


# -- keys at attach ------------------------------------------------------------------------------------


async def test_a_wrong_key_file_fails_the_attach_with_its_reason(volumes: Volumes, tmp_path: Path) -> None:
    right, wrong = tmp_path / "right.key", tmp_path / "wrong.key"
    right.write_bytes(random.Random(1).randbytes(32))
    wrong.write_bytes(random.Random(2).randbytes(32))
    vol = volumes.open(KeyFile=str(right))
    await vol.write_file("f", b"secret")
    await volumes.close(vol)
    with pytest.raises(StackError) as info:
        volumes.open(KeyFile=str(wrong))
    assert info.value.refused and info.value.status == NtStatus.FLT_DO_NOT_ATTACH
    assert f"wrong key: {wrong} does not open this volume" in str(info.value)
    assert not volumes.keys.exists()  # no random key made when a key file is given
    vol = volumes.open(KeyFile=str(right))
    assert await vol.read_file("f") == b"secret"


async def test_a_passphrase_volume_attaches_only_with_its_passphrase(volumes: Volumes) -> None:
    vol = volumes.open(Passphrase="correct horse")
    await vol.write_file("f", b"secret")
    await volumes.close(vol)
    for parameters, problem in (
        ({"Passphrase": "wrong horse"}, "wrong key: the passphrase does not open this volume"),
        ({}, "this volume's key is a passphrase: give encryption.Passphrase or PassphraseFile"),
    ):
        with pytest.raises(StackError) as info:
            volumes.open(**parameters)
        assert info.value.refused and problem in str(info.value)
    vol = volumes.open(Passphrase="correct horse")
    assert await vol.read_file("f") == b"secret"


async def test_a_volume_that_cannot_be_encrypted_is_refused(volumes: Volumes, tmp_path: Path) -> None:
    with pytest.raises(StackError) as info:
        volumes.open(KeyFile=str(tmp_path / "k"), Passphrase="p")
    assert info.value.refused and "give one key source, not KeyFile and Passphrase" in str(info.value)
    (volumes.backing / "plain.txt").write_bytes(b"not encrypted")
    with pytest.raises(StackError) as info:
        volumes.open()
    assert info.value.refused and "the volume already holds files (plain.txt)" in str(info.value)
    assert os.listdir(volumes.backing) == ["plain.txt"] and not volumes.keys.exists()


# -- O_DIRECT, detach ----------------------------------------------------------------------------------


@pytest.mark.parametrize("offset", [1, 100, 511, 4097])
async def test_a_misaligned_o_direct_request_is_refused_as_ext4_would(volumes: Volumes, offset: int) -> None:
    vol = volumes.open()
    data = random.Random(offset).randbytes(3 * BLOCK_SIZE)
    await vol.write_file("f", data)
    handle = await vol.open("f", os.O_RDWR | os.O_DIRECT)
    try:
        for request in (
            vol.read(handle, offset, 512),
            vol.write(handle, offset, bytes(512)),
            vol.read(handle, 512, 1000),
        ):
            with pytest.raises(OSError) as raised:
                await request
            assert raised.value.errno == errno.EINVAL
        # aligned requests work (the records below are not aligned: the filter's own handle is not O_DIRECT);
        # a write's length is not checked (page-cache writeback of a last partial page looks the same)
        assert await vol.read(handle, 512, 1024) == data[512:1536]
        assert await vol.write(handle, 4096 + 512, b"x" * 700) == 700
        expected = data[: 4096 + 512] + b"x" * 700 + data[4096 + 512 + 700 :]
        assert await vol.read(handle, 0, len(data)) == expected
    finally:
        await vol.close_handle(handle)
    assert await vol.read_file("f") == expected


async def test_detaching_by_hand_is_refused(volumes: Volumes, caplog: pytest.LogCaptureFixture) -> None:
    vol = volumes.open()
    await vol.write_file("f", b"data")
    with pytest.raises(StackError) as info:
        vol.stack.query_teardown(instance_of(vol))
    assert info.value.status == NtStatus.FLT_DO_NOT_DETACH
    assert "detaching by hand is refused" in caplog.text
    assert instance_of(vol) in vol.stack.instances
    assert await vol.read_file("f") == b"data"


# -- the buffers, seen from above and below ------------------------------------------------------------


async def test_a_filter_above_sees_plaintext_and_a_filter_below_ciphertext(volumes: Volumes) -> None:
    above, below = Probe("probe-above"), Probe("probe-below")
    vol = volumes.open((above.filter, "150000"), (below.filter, "140000"))
    data = marked(BLOCK_SIZE + 300, 5)
    handle = await vol.open("f", os.O_RDWR | os.O_CREAT)
    try:
        assert await vol.write(handle, 0, data) == len(data)
        assert await vol.read(handle, 100, 5000) == data[100:5100]
    finally:
        await vol.close_handle(handle)
    assert above.writes == [(0, data)]
    assert above.reads == [(100, data[100:5100])]
    [(offset, written)] = below.writes  # the header and both records, in one write from the start
    on_disk = (volumes.backing / "f").read_bytes()
    assert offset == 0 and written == on_disk and len(on_disk) == cipher_size(len(data))
    assert written.startswith(MAGIC) and MARK not in written
    [(offset, read)] = below.reads  # the records that cover bytes 100..5099 (the file id is known)
    assert offset == record_offset(0) and read == on_disk[record_offset(0) : record_offset(5099 // BLOCK_SIZE + 1)]
    await volumes.close(vol)

    above, below = Probe("probe-above"), Probe("probe-below")
    vol = volumes.open((above.filter, "150000"), (below.filter, "140000"))
    assert await vol.read_file("f") == data
    assert [offset for offset, _ in above.reads] == [0, len(data)]  # read_file reads until it gets nothing
    assert above.reads[0][1] == data
    # a volume that never saw the file reads the header with the records; then the last record again
    assert below.reads == [(0, on_disk), (record_offset(1), on_disk[record_offset(1) :])]
