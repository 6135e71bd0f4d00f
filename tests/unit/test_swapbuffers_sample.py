"""The swapbuffers sample in-process: every READ, WRITE and listing goes through a swapped buffer, and the
caller cannot tell: each result is compared with the same operation done with os.* on a plain directory.

Two probe filters frame it: one below (altitude 140000) records what the file system was asked and what it
returned (the swapped range and buffer), one above (150000) records what the caller asked and gets back.
"""

from __future__ import annotations

import errno
import logging
import os
import random
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio

import filters.swapbuffers as sample
from fltfuse import (
    CallbackData,
    DirectoryControlParameters,
    DirectoryEntry,
    Filter,
    FilterRegistration,
    Instance,
    InstanceTeardownFlags,
    MajorFunction,
    NtStatus,
    OperationRegistration,
    PostopCallbackStatus,
    PostopFlags,
    PreopCallbackStatus,
    ReadParameters,
    WriteParameters,
    _loader,
    complete_pended_postoperation,
    complete_pended_preoperation,
)
from fltfuse._stack import StackError
from fltfuse.testing import InProcessVolume

FINISHED = PostopCallbackStatus.FINISHED_PROCESSING
SIZES = (0, 1, 511, 512, 513, 4095, 4096, 4097, 65536 + 3, 200_000)
LENGTHS = (0, 1, 100, 511, 512, 513, 4096, 70_000)


def pattern(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


@dataclass
class Seen:
    """One request as a probe saw it: the range asked for, and the data object going down or coming back."""

    offset: int
    length: int
    data: Any = None
    entries: list[DirectoryEntry] = field(default_factory=list)


class Probe:
    """A test filter that records every READ, WRITE and listing it sees, in its pre and its post.

    ``on_read_post`` / ``on_write_post`` may be set to act in the post (hold the request, change the count).
    """

    def __init__(self, name: str):
        self.reads: list[Seen] = []  # READ as its post saw it: its range and the data it got
        self.writes: list[Seen] = []  # WRITE as its pre saw it: the data going down
        self.listings: list[Seen] = []  # DIRECTORY_CONTROL as its post saw it
        self.hold_reads = False  # pend each READ's pre (the test completes it)
        self.held: list[CallbackData] = []
        self.on_read_post: Callable[[CallbackData], PostopCallbackStatus] | None = None
        self.on_write_post: Callable[[CallbackData], None] | None = None
        operations = (
            OperationRegistration(MajorFunction.READ, self.pre_read, self.post_read),
            OperationRegistration(MajorFunction.WRITE, self.pre_write, self.post_write),
            OperationRegistration(MajorFunction.DIRECTORY_CONTROL, self.pre_listing, self.post_listing),
        )
        self.filter = Filter(name, FilterRegistration(operations=operations))

    def pre_read(self, cbd: CallbackData, objects: Any) -> PreopCallbackStatus:
        if self.hold_reads:
            self.held.append(cbd)
            return PreopCallbackStatus.PENDING
        return PreopCallbackStatus.SUCCESS_WITH_CALLBACK

    def post_read(self, cbd: CallbackData, objects: Any, context: Any, flags: PostopFlags) -> PostopCallbackStatus:
        p = cbd.iopb.parameters
        assert isinstance(p, ReadParameters)
        self.reads.append(Seen(p.offset, p.length, p.data))
        return self.on_read_post(cbd) if self.on_read_post else FINISHED

    def pre_write(self, cbd: CallbackData, objects: Any) -> PreopCallbackStatus:
        p = cbd.iopb.parameters
        assert isinstance(p, WriteParameters)
        self.writes.append(Seen(p.offset, len(p.data), p.data))
        return PreopCallbackStatus.SUCCESS_WITH_CALLBACK

    def post_write(self, cbd: CallbackData, objects: Any, context: Any, flags: PostopFlags) -> PostopCallbackStatus:
        if self.on_write_post:
            self.on_write_post(cbd)
        return FINISHED

    def pre_listing(self, cbd: CallbackData, objects: Any) -> PreopCallbackStatus:
        return PreopCallbackStatus.SUCCESS_WITH_CALLBACK

    def post_listing(self, cbd: CallbackData, objects: Any, context: Any, flags: PostopFlags) -> PostopCallbackStatus:
        p = cbd.iopb.parameters
        assert isinstance(p, DirectoryControlParameters)
        self.listings.append(Seen(p.offset, 0, entries=p.entries))
        return FINISHED


@dataclass
class Setup:
    """A volume with swapbuffers between two probes, over ``directory``; ``plain`` holds the same files."""

    vol: InProcessVolume
    instance: Instance
    below: Probe
    above: Probe
    directory: Path
    plain: Path

    def swaps(self) -> dict[MajorFunction, int]:
        state = sample.state_of(self.vol.stack.objects_of(self.instance, None))
        assert state is not None
        return dict(state.swaps)


@pytest.fixture
def make(tmp_path: Path) -> Iterator[Callable[..., Setup]]:
    """``make(files, SectorSize=...)``: the files written in both directories, the stack attached."""
    made: list[InProcessVolume] = []

    def build(files: dict[str, bytes], **parameters: str) -> Setup:
        directory, plain = tmp_path / f"vol-{len(made)}", tmp_path / f"plain-{len(made)}"
        for root in (directory, plain):
            root.mkdir()
            for name, data in files.items():
                (root / name).write_bytes(data)
        below, above = Probe("probe-below"), Probe("probe-above")
        vol = InProcessVolume(
            directory,
            ["swapbuffers", (below.filter, "140000"), (above.filter, "150000")],
            parameters={"swapbuffers": parameters},
        )
        made.append(vol)
        [instance] = [i for i in vol.stack.instances if i.filter.name == "swapbuffers"]
        return Setup(vol, instance, below, above, directory, plain)

    yield build
    for vol in made:
        vol.close()


def os_read(path: Path, offset: int, length: int, flags: int = 0) -> bytes | int:
    """pread(2) of a plain file: the bytes, or the errno."""
    fd = os.open(path, os.O_RDONLY | flags)
    try:
        return os.pread(fd, length, offset)
    except OSError as exc:
        return exc.errno
    finally:
        os.close(fd)


# -- the INF and the parameter -------------------------------------------------------------------------


def test_the_inf_places_it_in_the_encryption_group() -> None:
    inf = _loader.find_inf("swapbuffers")
    assert (inf.name, inf.load_order_group, inf.class_name) == ("swapbuffers", "FSFilter Encryption", "Encryption")
    assert (inf.class_guid.lower(), inf.warnings) == ("{a0a701c0-a511-42ff-aa6c-06dc0395576f}", ())
    spec = inf.instance(None)
    assert (spec.name, str(spec.altitude), spec.flags) == ("SwapBuffers Instance", "141000", 0)
    assert dict(inf.parameters) == {"SectorSize": 512}


@pytest.mark.parametrize("value", ["1000", "256", "131072", "0", "0x300"])
def test_a_bad_sector_size_fails_the_attach_naming_the_filter_and_value(tmp_path: Path, value: str) -> None:
    with pytest.raises(StackError) as raised:
        InProcessVolume(tmp_path, ["swapbuffers"], parameters={"swapbuffers": {"SectorSize": value}})
    assert raised.value.refused and raised.value.status is NtStatus.FLT_DO_NOT_ATTACH
    reason = f"SectorSize {int(value, 0)} is not a power of two from 512 to 65536"
    assert str(raised.value) == f"swapbuffers (instance SwapBuffers Instance): {reason}"


@pytest.mark.parametrize("value", ["4k", "", (), True])
def test_sector_size_refuses_what_is_not_a_number(value: Any) -> None:
    expected = f"SectorSize {value!r} is not a power of two from 512 to 65536"
    with pytest.raises(ValueError, match="^" + re.escape(expected) + "$"):
        sample.sector_size({"SectorSize": value})
    assert sample.sector_size({}) == 512
    assert sample.sector_size({"SectorSize": "0x1000"}) == 4096


# -- READ ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sector", [512, 4096, 65536])
async def test_reads_anywhere_return_what_ext4_returns_and_the_file_system_sees_whole_sectors(
    make: Callable[..., Setup], sector: int
) -> None:
    files = {f"f{size}": pattern(size, size) for size in SIZES}
    s = make(files, SectorSize=str(sector))
    rng = random.Random(sector)
    reads = 0
    for name, data in files.items():
        size = len(data)
        offsets = {0, 1, 511, 512, 513, 4095, 4096, size, size + 1, size + 1000, max(size - 1, 0), max(size - 700, 0)}
        offsets |= {rng.randrange(size + 2) for _ in range(4)}
        handle = await s.vol.open(name)
        try:
            for offset in sorted(offsets):
                for length in LENGTHS:
                    got = await s.vol.read(handle, offset, length)
                    assert got == os_read(s.plain / name, offset, length), (name, offset, length)
                    start = offset - offset % sector
                    end = -(-(offset + length) // sector) * sector
                    below, above = s.below.reads[-1], s.above.reads[-1]
                    assert (below.offset, below.length) == (start, end - start)  # the swapped range went down
                    assert (above.offset, above.length) == (offset, length)  # the post saw the caller's range
                    assert bytes(below.data) == data[start:end]  # the swapped buffer: whole sectors, short at EOF
                    assert above.data == got and above.data is not below.data  # a new object: the caller's slice
                    reads += 1
        finally:
            await s.vol.close_handle(handle)
    assert s.swaps()[MajorFunction.READ] == reads


async def test_read_file_through_the_stack_matches_the_plain_files(make: Callable[..., Setup]) -> None:
    files = {f"f{size}": pattern(size, size + 1) for size in SIZES}
    s = make(files)
    for name in files:
        assert await s.vol.read_file(name) == (s.plain / name).read_bytes()
    assert s.swaps()[MajorFunction.READ] == len(s.above.reads) > len(files)


@pytest.mark.parametrize(("offset", "length"), [(1, 100), (100, 100), (511, 100), (512, 700)])
async def test_a_misaligned_o_direct_read_is_still_refused_as_by_ext4(
    make: Callable[..., Setup], offset: int, length: int
) -> None:
    s = make({"f": pattern(8192, 3)})
    handle = await s.vol.open("f", os.O_RDONLY | os.O_DIRECT)
    try:
        with pytest.raises(OSError) as raised:
            await s.vol.read(handle, offset, length)
    finally:
        await s.vol.close_handle(handle)
    assert raised.value.errno == os_read(s.plain / "f", offset, length, os.O_DIRECT) == errno.EINVAL
    assert (s.below.reads[-1].offset, s.below.reads[-1].length) == (offset, length)  # not widened into success


async def test_a_failed_read_is_left_failed(make: Callable[..., Setup]) -> None:
    s = make({"f": b"data"})
    s.below.on_read_post = fail_with_eio
    handle = await s.vol.open("f")
    try:
        with pytest.raises(OSError) as raised:
            await s.vol.read(handle, 1, 2)
    finally:
        await s.vol.close_handle(handle)
    assert raised.value.errno == errno.EIO
    assert s.swaps()[MajorFunction.READ] == 0


def fail_with_eio(cbd: CallbackData) -> PostopCallbackStatus:
    cbd.io_status.status = NtStatus.IO_DEVICE_ERROR
    return FINISHED


# -- WRITE -----------------------------------------------------------------------------------------------


async def test_unaligned_writes_land_as_on_ext4_through_a_copy_of_the_callers_buffer(
    make: Callable[..., Setup],
) -> None:
    original = pattern(5000, 9)
    s = make({"f": original})
    rng = random.Random(5)
    writes = [(0, 1), (1, 511), (511, 2), (4999, 3), (5000, 100), (7000, 513), (12_345, 70_000)]
    writes += [(rng.randrange(90_000), rng.randrange(1, 9000)) for _ in range(20)]
    handle = await s.vol.open("f", os.O_RDWR)
    fd = os.open(s.plain / "f", os.O_RDWR)
    try:
        for i, (offset, length) in enumerate(writes):
            data = pattern(length, 100 + i)
            assert await s.vol.write(handle, offset, data) == os.pwrite(fd, data, offset) == length
            above, below = s.above.writes[-1], s.below.writes[-1]
            assert above.data is data  # the caller's buffer, as the caller handed it
            assert isinstance(below.data, bytearray) and below.data is not data  # the swapped buffer went down
            assert (below.offset, bytes(below.data)) == (offset, data)
    finally:
        await s.vol.close_handle(handle)
        os.close(fd)
    assert (s.directory / "f").read_bytes() == (s.plain / "f").read_bytes()
    assert s.swaps()[MajorFunction.WRITE] == len(writes)


async def test_write_file_through_the_stack_matches_a_plain_write(make: Callable[..., Setup]) -> None:
    s = make({})
    data = pattern(3 * 128 * 1024 + 7, 11)
    await s.vol.write_file("new", data)
    (s.plain / "new").write_bytes(data)
    assert (s.directory / "new").read_bytes() == (s.plain / "new").read_bytes()
    assert await s.vol.read_file("new") == data


async def test_a_count_written_beyond_the_callers_data_fails_the_write(
    make: Callable[..., Setup], caplog: pytest.LogCaptureFixture
) -> None:
    s = make({"f": b""})

    def inflate(cbd: CallbackData) -> None:
        cbd.io_status.information += 1  # a filter below reports more than it was given

    s.below.on_write_post = inflate
    handle = await s.vol.open("f", os.O_WRONLY)
    try:
        with pytest.raises(OSError) as raised:
            await s.vol.write(handle, 0, b"abc")
    finally:
        await s.vol.close_handle(handle)
    assert raised.value.errno == errno.EIO
    assert "4 bytes written of a swapped buffer of 3 (the caller gave 3): failing the write" in caplog.text


# -- DIRECTORY_CONTROL -------------------------------------------------------------------------------------


async def test_a_big_listing_is_swapped_and_identical_to_an_unfiltered_one(make: Callable[..., Setup]) -> None:
    files = {f"file-{i:04d}-{'x' * (i % 40)}": pattern(i % 7, i) for i in range(600)}
    s = make(files)
    for root in (s.directory, s.plain):
        for i in range(20):
            (root / f"dir-{i}").mkdir()
        (root / "link").symlink_to("file-0001")
    listed = await s.vol.listdir(".")
    assert sorted(listed) == sorted(os.listdir(s.plain))
    unfiltered = InProcessVolume(s.directory)
    try:
        assert listed == await unfiltered.listdir(".")  # the same entries in the same order
    finally:
        unfiltered.close()
    assert len(s.above.listings) == len(s.below.listings) == s.swaps()[MajorFunction.DIRECTORY_CONTROL] > 1
    for above, below in zip(s.above.listings, s.below.listings, strict=True):
        assert above.entries == below.entries  # same names, attributes and next offsets
        assert above.entries is not below.entries
        assert all(
            a is not b and a.attributes is not b.attributes for a, b in zip(above.entries, below.entries, strict=True)
        )


# -- draining -----------------------------------------------------------------------------------------------


async def read_while_detaching(s: Setup, release: Callable[[], None], ready: Callable[[], bool]) -> bytes | int:
    """Read 100 bytes at 700 while the probe below holds the request, detach swapbuffers, then let it go on."""
    outcome: list[bytes | int] = []
    handle = await s.vol.open("f")

    async def read() -> None:
        try:
            outcome.append(await s.vol.read(handle, 700, 100))
        except OSError as exc:
            outcome.append(exc.errno)

    try:
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(read)
                while not ready():
                    await trio.sleep(0.001)
                await s.vol.stack.detach(s.instance, InstanceTeardownFlags.MANUAL)  # drains its post
                assert s.instance not in s.vol.stack.instances
                release()
    finally:
        await s.vol.close_handle(handle)
    return outcome[0]


async def test_draining_before_the_data_came_back_fails_the_read_instead_of_returning_the_wrong_range(
    make: Callable[..., Setup],
) -> None:
    s = make({"f": pattern(5000, 1)})
    s.below.hold_reads = True
    got = await read_while_detaching(
        s,
        lambda: complete_pended_preoperation(s.below.held[0], PreopCallbackStatus.SUCCESS_WITH_CALLBACK),
        lambda: bool(s.below.held),
    )
    assert got == errno.EINTR
    assert (s.below.reads[0].offset, s.below.reads[0].length) == (512, 512)  # the swapped range was read


async def test_draining_after_the_data_came_back_leaves_the_callers_slice(make: Callable[..., Setup]) -> None:
    data = pattern(5000, 2)
    s = make({"f": data})
    held: list[CallbackData] = []

    def hold(cbd: CallbackData) -> PostopCallbackStatus:
        held.append(cbd)
        return PostopCallbackStatus.MORE_PROCESSING_REQUIRED

    s.below.on_read_post = hold
    got = await read_while_detaching(s, lambda: complete_pended_postoperation(held[0]), lambda: bool(held))
    assert got == data[700:800]
    assert s.above.reads[0].data == data[700:800]


# -- the instance's own counts -------------------------------------------------------------------------------


async def test_teardown_logs_the_swaps(make: Callable[..., Setup], caplog: pytest.LogCaptureFixture) -> None:
    s = make({"f": b"0123456789"})
    assert await s.vol.read_file("f") == b"0123456789"
    await s.vol.write_file("g", b"x")
    await s.vol.listdir(".")
    counts = s.swaps()
    assert counts == {MajorFunction.READ: 2, MajorFunction.WRITE: 1, MajorFunction.DIRECTORY_CONTROL: 2}
    with caplog.at_level(logging.INFO, logger="fltfuse.filters.swapbuffers"):
        await s.vol.stack.detach(s.instance, InstanceTeardownFlags.MANUAL)
    assert "instance SwapBuffers Instance swapped 2 reads, 1 writes, 2 listings" in caplog.text
