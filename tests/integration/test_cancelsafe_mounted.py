"""The cancelsafe sample on a real mount: held reads, Ctrl-C and kill while held, and unload while reads are queued."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fltfuse.testing import MountedVolume, mounted_volume, why_no_mount
from tests.child import PythonChild

pytestmark = pytest.mark.skipif(why_no_mount() is not None, reason=str(why_no_mount()))

DELAY = 2.0  # seconds: the mount's --param cancelsafe.OperatingDelay
CONTENT = b"held back by cancelsafe\n"

# A reader that makes exactly one read(2) through libc, so that EINTR reaches it (os.read would retry, PEP 475),
# with a SIGUSR1 handler installed by signal.signal (no SA_RESTART). It prints one JSON line when the read returns.
READER = r"""
import ctypes, json, os, signal, sys, time
libc = ctypes.CDLL(None, use_errno=True)
libc.read.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t]
libc.read.restype = ctypes.c_ssize_t
caught = []
signal.signal(signal.SIGUSR1, lambda signum, frame: caught.append(signum))
fd = os.open(sys.argv[1], os.O_RDONLY)
buf = ctypes.create_string_buffer(65536)
print("open", flush=True)
start = time.monotonic()
n = libc.read(fd, buf, 65536)
err = ctypes.get_errno()
took = time.monotonic() - start
print(json.dumps({"n": n, "errno": err, "took": took, "data": buf.raw[: max(n, 0)].decode(), "caught": caught}))
"""


@pytest.fixture(scope="module")
def vol(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MountedVolume]:
    directory = tmp_path_factory.mktemp("cancelsafe", numbered=True)
    parameters = {"cancelsafe": {"OperatingDelay": str(round(DELAY * 1000)), "OperatingPath": "held"}}
    with mounted_volume(directory, size="128M", filters=("cancelsafe",), parameters=parameters) as mounted:
        # Made through the mount after the instance attached: tracked from post-CREATE.
        root = Path(mounted.mountpoint)
        (root / "held").mkdir()
        (root / "held" / "file.txt").write_bytes(CONTENT)
        (root / "elsewhere.txt").write_bytes(b"served at once\n")
        yield mounted


@pytest.fixture(autouse=True)
def clean_log(vol: MountedVolume) -> Iterator[None]:
    """The daemon logs no error or traceback during the test."""
    start = len(vol.log_text())
    yield
    vol.assert_no_errors_logged(start)


def held(vol: MountedVolume) -> str:
    return os.path.join(vol.mountpoint, "held", "file.txt")


def wait_until_blocked_in_fuse(pid: int, timeout: float = 10.0) -> None:
    """Wait until process ``pid`` waits for an answer from the FUSE daemon (its read is on its way or held)."""
    start = time.monotonic()
    wchan = ""
    while time.monotonic() < start + timeout:
        try:
            wchan = Path(f"/proc/{pid}/wchan").read_text()
        except OSError:
            wchan = ""
        if wchan == "request_wait_answer":
            return
        if wchan in ("", "0") and time.monotonic() > start + 0.5:
            return  # no wchan on this kernel: half a second is plenty for the read to be on its way
        time.sleep(0.01)
    pytest.fail(f"process {pid} never blocked in a FUSE request (wchan {wchan!r})")


def start_reader(path: str) -> PythonChild:
    reader = PythonChild(READER, path)
    reader.expect("open\n")
    wait_until_blocked_in_fuse(reader.pid)
    return reader


def test_reads_under_the_path_are_held_and_others_are_not(vol: MountedVolume) -> None:
    start = time.monotonic()
    done = subprocess.run(["cat", held(vol)], capture_output=True, timeout=30)
    took = time.monotonic() - start
    assert (done.returncode, done.stdout) == (0, CONTENT)
    assert took >= DELAY  # each read(2) waits: cat's read of the data and its read of the end of the file
    start = time.monotonic()
    done = subprocess.run(["cat", os.path.join(vol.mountpoint, "elsewhere.txt")], capture_output=True, timeout=30)
    assert (done.returncode, done.stdout) == (0, b"served at once\n")
    assert time.monotonic() - start < DELAY / 4


def test_a_signalled_reader_gets_eintr_at_once(vol: MountedVolume) -> None:
    reader = start_reader(held(vol))
    signalled = time.monotonic()
    os.kill(reader.pid, signal.SIGUSR1)
    result = reader.outcome(timeout=10)
    assert time.monotonic() - signalled < 1.0
    assert (result["n"], result["errno"], result["caught"]) == (-1, errno.EINTR, [signal.SIGUSR1])
    assert isinstance(result["took"], float) and result["took"] < DELAY / 2
    # The same file read again, unsignalled, is held for the delay and then served.
    reader = start_reader(held(vol))
    result = reader.outcome(timeout=10)
    assert (result["n"], result["errno"], result["data"]) == (len(CONTENT), 0, CONTENT.decode())
    assert isinstance(result["took"], float) and result["took"] >= DELAY - 0.05


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGKILL], ids=["SIGINT", "SIGKILL"])
def test_a_reader_killed_while_held_dies_at_once(vol: MountedVolume, signum: int) -> None:
    cat = subprocess.Popen(["cat", held(vol)], stdout=subprocess.DEVNULL)
    wait_until_blocked_in_fuse(cat.pid)
    killed = time.monotonic()
    os.kill(cat.pid, signum)  # Ctrl-C (cat keeps the default action) or kill -9
    assert cat.wait(timeout=10) == -signum
    assert time.monotonic() - killed < 1.0


def test_unloading_while_reads_are_queued_lets_them_go_and_the_mount_keeps_serving(vol: MountedVolume) -> None:
    fltmc = [sys.executable, "-m", "fltfuse.fltmc"]
    readers = [start_reader(held(vol)) for _ in range(3)]
    try:
        start = time.monotonic()
        done = subprocess.run(
            [*fltmc, "unload", "cancelsafe", vol.mountpoint], capture_output=True, text=True, timeout=30
        )
        assert done.returncode == 0, done.stderr
        assert time.monotonic() - start < DELAY / 2 + 1.0  # no waiting for the delay, no hang
        for reader in readers:
            result = reader.outcome(timeout=10)
            assert (result["n"], result["errno"], result["data"]) == (len(CONTENT), 0, CONTENT.decode())
            assert isinstance(result["took"], float) and result["took"] < DELAY
    finally:
        for reader in readers:
            reader.kill()
    instances = subprocess.run([*fltmc, "instances", vol.mountpoint], capture_output=True, text=True, timeout=30).stdout
    assert "cancelsafe" not in instances
    # The mount keeps serving, without the filter.
    start = time.monotonic()
    assert Path(held(vol)).read_bytes() == CONTENT
    assert time.monotonic() - start < DELAY / 4
    cached = os.open(held(vol), os.O_RDONLY)  # opened without the filter: it uses the page cache
    try:
        done = subprocess.run(
            [*fltmc, "load", "cancelsafe", vol.mountpoint], capture_output=True, text=True, timeout=30
        )
        assert done.returncode == 0, done.stderr
        # Loaded again: the instance finds the directory by walking the backing ext4, and holds reads again ...
        fd = os.open(held(vol), os.O_RDONLY)
        try:
            start = time.monotonic()
            assert os.read(fd, 4096) == CONTENT
            assert time.monotonic() - start >= DELAY - 0.05
        finally:
            os.close(fd)
        # ... but not the page cache's reads for a file opened before it attached (SKIP_PAGING_IO).
        os.posix_fadvise(cached, 0, 0, os.POSIX_FADV_DONTNEED)  # so that this read is a page fill
        start = time.monotonic()
        assert os.pread(cached, 4096, 0) == CONTENT
        assert time.monotonic() - start < DELAY / 4
    finally:
        os.close(cached)
