"""The swapbuffers sample on a real mount: ordinary tools see the same files and listings as on ext4.

Each test runs on two mounts: with the INF's SectorSize (512) and with 65536, where every page-cache read
(4 KiB pages, readahead windows) is widened to 64 KiB boundaries on its way down, so the caller's slice is
cut out of a bigger swapped buffer.
"""

from __future__ import annotations

import filecmp
import mmap
import os
import random
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from fltfuse.testing import MountedVolume, mounted_volume, release, why_no_mount
from tests.child import PythonChild

pytestmark = pytest.mark.skipif(why_no_mount() is not None, reason=str(why_no_mount()))

Run = Callable[..., subprocess.CompletedProcess[str]]
SIZES = (0, 1, 511, 512, 513, 1024 * 1024 + 7)
SWAPS = re.compile(r"instance SwapBuffers Instance swapped (\d+) reads, (\d+) writes, (\d+) listings")


def pattern(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


@pytest.fixture(scope="module", params=["512", "65536"], ids=["sector512", "sector65536"])
def vol(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[MountedVolume]:
    directory = tmp_path_factory.mktemp("swapbuffers", numbered=True)
    parameters = {"swapbuffers": {"SectorSize": request.param}}
    with mounted_volume(directory, size="128M", filters=("swapbuffers",), parameters=parameters) as mounted:
        yield mounted


@pytest.fixture
def clean_log(vol: MountedVolume) -> Iterator[None]:
    """The daemon logs no error or traceback during the test."""
    start = len(vol.log_text())
    yield
    vol.assert_no_errors_logged(start)


@pytest.fixture
def place(vol: MountedVolume, clean_log: None, request: pytest.FixtureRequest) -> tuple[Path, Path]:
    """A fresh directory for the test (the daemon logs no error meanwhile): its path on the mount, and the
    same directory on the backing ext4."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", request.node.name)
    mnt = Path(vol.mountpoint) / name
    mnt.mkdir()
    return mnt, Path(vol.backing) / name


def uncache(*paths: Path) -> None:
    """Make the next reads of ``paths`` go to the daemon (and so through the filter), not to the page cache:
    their dirty pages written back, then their pages dropped."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def test_cp_in_and_out_keeps_every_byte(place: tuple[Path, Path], tmp_path: Path, run: Run) -> None:
    mnt, backing = place
    (tmp_path / "in").mkdir()
    (tmp_path / "out").mkdir()
    for size in SIZES:
        (tmp_path / "in" / f"f{size}").write_bytes(pattern(size, size))
    run("sh", "-c", f'cp "{tmp_path}"/in/* "{mnt}"/')
    uncache(*mnt.iterdir())
    run("sh", "-c", f'cp "{mnt}"/* "{tmp_path}"/out/')
    for size in SIZES:
        name = f"f{size}"
        original = tmp_path / "in" / name
        run("cmp", original, mnt / name)
        run("cmp", original, tmp_path / "out" / name)
        assert (backing / name).read_bytes() == original.read_bytes()  # unchanged at rest: data is not transformed
        assert os.stat(mnt / name).st_size == size


def test_ls_and_find_list_what_the_backing_ext4_lists(place: tuple[Path, Path], run: Run) -> None:
    mnt, backing = place
    for i in range(400):
        (mnt / f"file-{i:03d}{'-' * (i % 50)}").write_bytes(pattern(i * 3, i))
    for i in range(12):
        (mnt / f"dir-{i}").mkdir()
        (mnt / f"dir-{i}" / "inner").write_bytes(b"x" * i)
    os.symlink("file-001", mnt / "link")
    for argv in (["ls", "-lAn", "--time-style=+%s.%N"], ["ls", "-1aU"]):
        through, raw = run(*argv, cwd=mnt).stdout, run(*argv, cwd=backing).stdout
        assert through == raw, argv
        assert len(through.splitlines()) >= 413
    printf = r"%P\t%y\t%s\t%m\t%n\t%U\t%G\t%T@\t%l\n"
    through = run("find", ".", "-printf", printf, cwd=mnt).stdout
    raw = run("find", ".", "-printf", printf, cwd=backing).stdout
    assert sorted(through.splitlines()) == sorted(raw.splitlines())
    assert len(through.splitlines()) == 1 + 400 + 12 * 2 + 1


def test_mmap_reads_and_writes_go_through_as_on_ext4(place: tuple[Path, Path], tmp_path: Path) -> None:
    mnt, backing = place
    data = bytearray(pattern(3 * 4096 + 123, 7))
    (mnt / "mapped").write_bytes(data)
    uncache(mnt / "mapped")
    fd = os.open(mnt / "mapped", os.O_RDWR)
    try:
        with mmap.mmap(fd, len(data)) as m:
            assert m[:] == data  # page faults: READs of whole pages, cut out of the swapped buffers
            for offset, chunk in ((1, b"one"), (4095, b"across a page"), (3 * 4096 + 100, b"tail")):
                m[offset : offset + len(chunk)] = chunk
                data[offset : offset + len(chunk)] = chunk
            m.flush()  # msync: the dirty pages go down as WRITEs
    finally:
        os.close(fd)
    assert (backing / "mapped").read_bytes() == data
    uncache(mnt / "mapped")
    assert (mnt / "mapped").read_bytes() == data


@pytest.mark.parametrize(
    "dd",
    [
        ["bs=777"],
        ["bs=1000", "skip=3", "count=700"],
        ["bs=4097", "skip=11"],
        ["bs=65537", "count=3"],
        ["bs=4096", "iflag=direct"],
        ["bs=1536", "skip=5", "iflag=direct"],
    ],
    ids=lambda dd: "-".join(dd),
)
def test_dd_with_odd_block_sizes_reads_what_ext4_reads(
    place: tuple[Path, Path], tmp_path: Path, run: Run, dd: list[str]
) -> None:
    mnt, backing = place
    source = tmp_path / "source"
    source.write_bytes(pattern(1024 * 1024 + 7, 3))
    run("dd", f"if={source}", f"of={mnt / 'f'}", "bs=777", "status=none")  # 777-byte write(2)s
    uncache(mnt / "f")
    assert (backing / "f").read_bytes() == source.read_bytes()
    run("dd", f"if={mnt / 'f'}", f"of={tmp_path / 'through'}", *dd, "status=none")
    run("dd", f"if={source}", f"of={tmp_path / 'plain'}", *(a for a in dd if a != "iflag=direct"), "status=none")
    assert filecmp.cmp(tmp_path / "through", tmp_path / "plain", shallow=False)


def test_dd_writes_at_odd_offsets_land_as_on_ext4(place: tuple[Path, Path], tmp_path: Path, run: Run) -> None:
    mnt, backing = place
    plain = tmp_path / "plain"
    for target in (mnt / "f", plain):
        target.write_bytes(pattern(100_000, 4))
        for i, (bs, seek) in enumerate(((333, 7), (1, 99_999), (4097, 20), (513, 300))):
            patch = tmp_path / f"patch-{i}"
            patch.write_bytes(pattern(bs * 2, 40 + i))
            run("dd", f"if={patch}", f"of={target}", f"bs={bs}", f"seek={seek}", "conv=notrunc", "status=none")
    uncache(mnt / "f")
    assert (backing / "f").read_bytes() == plain.read_bytes()
    run("cmp", mnt / "f", plain)


def test_a_bad_sector_size_fails_the_mount_with_its_reason(tmp_path_factory: pytest.TempPathFactory) -> None:
    directory = tmp_path_factory.mktemp("swapbuffers-bad", numbered=True)
    parameters = {"swapbuffers": {"SectorSize": "1000"}}
    try:
        with pytest.raises(RuntimeError) as raised:
            with mounted_volume(directory, size="64M", filters=("swapbuffers",), parameters=parameters):
                pass
    finally:
        release(str(directory / "mnt"), str(directory / "volume.img"))  # raises if a mount or loop device stayed
    reason = "swapbuffers (instance SwapBuffers Instance): SectorSize 1000 is not a power of two from 512 to 65536"
    assert f"failed: {reason}" in str(raised.value)


def test_fltmc_detach_logs_the_swaps_and_reads_stay_right(tmp_path_factory: pytest.TempPathFactory) -> None:
    """On a mount of its own: detach it while a reader reads on, then the log has its counts."""
    directory = tmp_path_factory.mktemp("swapbuffers-detach", numbered=True)
    parameters = {"swapbuffers": {"SectorSize": "65536"}}
    with mounted_volume(directory, size="128M", filters=("swapbuffers",), parameters=parameters) as mounted:
        data = pattern(1024 * 1024, 5)
        path = Path(mounted.mountpoint) / "f"
        path.write_bytes(data)
        os.listdir(mounted.mountpoint)
        reader = PythonChild(READER, path)
        try:
            reader.expect("ok\n")  # a first pass through the filter
            fltmc = [sys.executable, "-m", "fltfuse.fltmc"]
            subprocess.run([*fltmc, "detach", "swapbuffers", mounted.mountpoint], check=True, timeout=60)
            instances = [*fltmc, "instances", mounted.mountpoint]
            listed = subprocess.run(instances, capture_output=True, text=True, check=True, timeout=60).stdout
            assert "swapbuffers" not in listed.lower(), listed
            reader.expect("ok\n")  # and a pass after: every read right, through the detach
        finally:
            reader.kill()
        assert path.read_bytes() == data
    [(reads, writes, listings)] = SWAPS.findall(mounted.log_text())
    assert int(reads) > 0 and int(writes) > 0 and int(listings) > 0


# Reads the file with O_DIRECT (each read(2) a READ request) at 512-aligned offsets and lengths, checking each
# against the expected bytes; prints "ok" after each pass of 200 reads, or "mismatch" and exits.
READER = r"""
import mmap, os, random, sys
path = sys.argv[1]
expected = open(path, "rb").read()
rng = random.Random(1)
fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
while True:
    for _ in range(200):
        offset = 512 * rng.randrange(len(expected) // 512 + 2)
        buf = mmap.mmap(-1, 512 * rng.randrange(1, 40))
        n = os.preadv(fd, [buf], offset)
        if buf[:n] != expected[offset : offset + len(buf)]:
            print("mismatch at", offset, flush=True)
            sys.exit(1)
    print("ok", flush=True)
"""
