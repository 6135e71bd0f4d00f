"""The scanner on a real mount, with its service ``fltfuse-scanner --volume MNT`` (or with no arguments at all):
what ordinary processes see when they copy, cat and write files, with the pattern engine and with a real clamd.

One mount for the module (Policy=deny, ScanTimeout=10 s); each test starts its own service and stops it
afterwards (one service at a time: the port takes one connection). Files are put straight onto the backing
volume when they must reach the mount unscanned.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import mmap
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from filters.scanner.engines import PatternEngine, eicar
from fltfuse.testing import MountedVolume, mounted_volume, why_no_mount
from tests.child import PythonChild
from tests.clamd import TEST_PATTERN, TEST_PATTERN_SIGNATURE, clamscan_verdicts, running_clamd
from tests.scanner_service import CLEAN, Service, clamav_samples, slow_rules

pytestmark = pytest.mark.skipif(why_no_mount() is not None, reason=str(why_no_mount()))

TIMEOUT = 10.0  # seconds: the mount's ScanTimeout
ALLOW_TIMEOUT = 3.0  # seconds: allow_vol's ScanTimeout
EICAR = eicar()
NOISE = random.Random(7).randbytes(64 << 20)  # incompressible, free of every pattern used here
EXTENSIONS = "exe,doc,txt,bat,cmd,inf,com,bin"  # the Windows sample's list, and com and bin

# Opens argv[1] for reading and prints one JSON line: errno (0 if it opened) and the CLOCK_MONOTONIC times
# (comparable across processes) just before and after open(2).
OPENER = r"""
import json, os, sys, time
print("opening", flush=True)
start = time.monotonic()
try:
    os.close(os.open(sys.argv[1], os.O_RDONLY))
    err = 0
except OSError as exc:
    err = exc.errno
print(json.dumps({"errno": err, "start": start, "end": time.monotonic()}))
"""


@pytest.fixture(scope="module")
def vol(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MountedVolume]:
    directory = tmp_path_factory.mktemp("scanner", numbered=True)
    parameters = {"scanner": {"Policy": "deny", "ScanTimeout": str(round(TIMEOUT * 1000))}}
    with mounted_volume(directory, size="512M", filters=("scanner",), parameters=parameters) as mounted:
        yield mounted


@pytest.fixture(autouse=True)
def clean_log(vol: MountedVolume, allow_vol: MountedVolume) -> Iterator[None]:
    """The daemons log no error or traceback during the test."""
    starts = [(mounted, len(mounted.log_text())) for mounted in (vol, allow_vol)]
    yield
    bad = [line for mounted, start in starts for line in mounted.errors_logged(start)]
    assert not bad, "the daemons logged errors:\n" + "\n".join(bad)


def connected(vol: MountedVolume, service: Service) -> bool:
    return f"scanner: service fltfuse-scanner (pid {service.pid}) connected" in vol.log_text()


def disconnected(vol: MountedVolume, service: Service) -> bool:
    return f"scanner: service pid {service.pid} disconnected" in vol.log_text()


@pytest.fixture(scope="module")
def allow_vol(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MountedVolume]:
    """A second mount with the scanner sample's settings: Policy=allow, its Extensions (and com, bin), and a
    quarantine directory."""
    directory = tmp_path_factory.mktemp("scanner-allow", numbered=True)
    parameters = {
        "scanner": {
            "Policy": "allow",
            "ScanTimeout": str(round(ALLOW_TIMEOUT * 1000)),
            "Extensions": EXTENSIONS,
            "Quarantine": ".quarantine",
        }
    }
    with mounted_volume(directory, size="256M", filters=("scanner",), parameters=parameters) as mounted:
        yield mounted


@pytest.fixture
def serve(vol: MountedVolume, tmp_path: Path, wait_for: Callable[..., Any]) -> Iterator[Callable[..., Service]]:
    """``serve(*args)`` starts ``fltfuse-scanner --volume MNT -v --log LOG *args`` and waits until the filter
    has it connected (``command=[...]``: that command line instead, with its stderr as the log; ``on=``: serve
    that mount instead of ``vol``). Every service is stopped after the test, and its disconnection seen by the
    filter, so that the next one can connect."""
    started: list[tuple[MountedVolume, Service]] = []

    def start(*args: str, command: list[str] | None = None, on: MountedVolume = vol) -> Service:
        log = tmp_path / f"service-{len(started)}.log"
        if command is None:
            service = Service.start(["--volume", on.mountpoint, *args], log)
        else:
            service = Service.start(args, log.with_suffix(".out"), command=command)
        started.append((on, service))
        wait_for(lambda: connected(on, service) or service.process.poll() is not None, "the service to connect")
        assert connected(on, service), service.log_text()
        return service

    yield start
    for served, service in started:
        service.stop()
        if connected(served, service):
            wait_for(lambda v=served, s=service: disconnected(v, s), "the filter to see the service go")


def mnt(vol: MountedVolume, name: str) -> Path:
    return Path(vol.mountpoint) / name


def put(vol: MountedVolume, name: str, content: bytes) -> None:
    """Put a file straight onto the backing volume, behind the scanner's back."""
    path = Path(vol.backing) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)


def cat(path: Path) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["cat", str(path)], capture_output=True, timeout=60)


def denied(done: subprocess.CompletedProcess[bytes]) -> bool:
    return done.returncode != 0 and b"Permission denied" in done.stderr and done.stdout == b""


def blocked_in_fuse(pid: int) -> bool:
    """Whether process ``pid`` waits for an answer from the FUSE daemon."""
    try:
        return Path(f"/proc/{pid}/wchan").read_text() == "request_wait_answer"
    except OSError:
        return False


def start_opener(path: Path) -> PythonChild:
    """A process opening ``path`` (OPENER); returns once it is about to call open(2)."""
    opener = PythonChild(OPENER, path)
    opener.expect("opening\n")
    return opener


# -- the pattern engine -----------------------------------------------------------------------------------------


def test_a_clean_file_copies_in_and_opens_and_its_second_open_sends_no_scan(
    vol: MountedVolume, serve: Callable[..., Service], tmp_path: Path
) -> None:
    service = serve()
    source = tmp_path / "clean.txt"
    source.write_bytes(CLEAN)
    subprocess.run(["cp", str(source), str(mnt(vol, "copied.txt"))], check=True, timeout=60)
    assert service.verdicts() == ["clean write /copied.txt", "clean close /copied.txt"]
    for _ in range(2):  # both served from the verdict of the close
        assert cat(mnt(vol, "copied.txt")).stdout == CLEAN
    put(vol, "placed.txt", CLEAN)
    for _ in range(2):
        assert cat(mnt(vol, "placed.txt")).stdout == CLEAN
    assert service.verdicts() == ["clean write /copied.txt", "clean close /copied.txt", "clean open /placed.txt"]


def test_an_eicar_file_on_the_backing_volume_cannot_be_read(vol: MountedVolume, serve: Callable[..., Service]) -> None:
    service = serve()
    put(vol, "eicar.com", EICAR)
    # in the middle of 4 MiB, across the 1 MiB steps the filter reads the file in
    put(vol, "buried.bin", NOISE[: (3 << 20) - 20] + EICAR + NOISE[: 1 << 20])
    assert denied(cat(mnt(vol, "eicar.com")))
    with pytest.raises(PermissionError):  # again, from the verdict cache
        mnt(vol, "eicar.com").read_bytes()
    assert denied(cat(mnt(vol, "buried.bin")))
    assert service.verdicts() == [
        "INFECTED open /eicar.com: EICAR-Test-File",
        "INFECTED open /buried.bin: EICAR-Test-File",
    ]
    assert "scanner: open of /eicar.com denied: EICAR-Test-File found by pattern" in vol.log_text()


def test_a_second_service_cannot_connect_while_the_first_serves(
    vol: MountedVolume, serve: Callable[..., Service], tmp_path: Path, wait_for: Callable[..., Any]
) -> None:
    """The scanner sample's accept (6), MaxConnections=1: a second service is refused (it says so, and tries
    again each second); once the first goes, it connects and serves."""
    first = serve()
    second = Service.start(["--volume", vol.mountpoint], tmp_path / "second.log")
    try:
        wait_for(lambda: "allows 1 connection" in second.log_text(), "the second service to be refused")
        assert second.process.poll() is None and not connected(vol, second)
        put(vol, "second/clean.txt", CLEAN)
        assert cat(mnt(vol, "second/clean.txt")).stdout == CLEAN
        assert first.verdicts() == ["clean open /second/clean.txt"]
        first.stop()
        wait_for(lambda: connected(vol, second), "the second service to connect")
        put(vol, "second/eicar.com", EICAR)
        assert denied(cat(mnt(vol, "second/eicar.com")))
        assert second.verdicts() == ["INFECTED open /second/eicar.com: EICAR-Test-File"]
    finally:
        second.stop()
        if connected(vol, second):
            wait_for(lambda: disconnected(vol, second), "the filter to see the second service go")


def test_writing_eicar_through_the_mount_fails_at_write(vol: MountedVolume, serve: Callable[..., Service]) -> None:
    service = serve()
    env = {**os.environ, "DATA": EICAR.decode()}
    printf = subprocess.run(
        ["sh", "-c", 'printf "%s" "$DATA" > "$1"', "sh", str(mnt(vol, "printf.txt"))], env=env, capture_output=True
    )
    assert printf.returncode != 0, printf
    redirected = subprocess.run(
        ["sh", "-c", 'cat > "$1"', "sh", str(mnt(vol, "cat.txt"))], input=EICAR, capture_output=True
    )
    assert redirected.returncode != 0 and b"write error: Permission denied" in redirected.stderr
    fd = os.open(mnt(vol, "python.txt"), os.O_WRONLY | os.O_CREAT)
    try:
        with pytest.raises(OSError) as excinfo:
            os.write(fd, EICAR)
        assert excinfo.value.errno == errno.EACCES
    finally:
        os.close(fd)
    names = ("printf.txt", "cat.txt", "python.txt")
    for name in names:
        assert (Path(vol.backing) / name).read_bytes() == b"", name  # nothing reached the disk
    assert service.verdicts() == [f"INFECTED write /{name}: EICAR-Test-File" for name in names]


def test_a_pattern_split_across_writes_makes_the_file_unopenable_at_close(
    vol: MountedVolume, serve: Callable[..., Service]
) -> None:
    service = serve()
    fd = os.open(mnt(vol, "split.txt"), os.O_WRONLY | os.O_CREAT)
    assert os.write(fd, EICAR[:30]) == 30
    assert os.write(fd, EICAR[30:]) == len(EICAR) - 30
    os.close(fd)  # succeeds: the data is written; the rescan makes the file unopenable
    # The same through a descriptor closed twice: a copy closed between the writes rescans the first half.
    fd = os.open(mnt(vol, "dup.txt"), os.O_WRONLY | os.O_CREAT)
    os.write(fd, EICAR[:30])
    os.close(os.dup(fd))
    os.write(fd, EICAR[30:])
    os.close(fd)
    for name in ("split.txt", "dup.txt"):
        assert (Path(vol.backing) / name).read_bytes() == EICAR
        assert denied(cat(mnt(vol, name)))
    assert service.verdicts() == [
        "clean write /split.txt",
        "clean write /split.txt",
        "INFECTED close /split.txt: EICAR-Test-File",
        "clean write /dup.txt",
        "clean close /dup.txt",
        "clean write /dup.txt",
        "INFECTED close /dup.txt: EICAR-Test-File",
    ]


class SharedMapping:
    """``path`` opened O_RDWR and its first ``size`` bytes mapped MAP_SHARED, read-write, with mmap(2) itself
    (Python's ``mmap.mmap`` keeps a duplicate of the descriptor, whose close(2) would be one more CLEANUP).
    As a context manager: the descriptor is closed and the mapping unmapped at the end, if still open."""

    _libc = ctypes.CDLL(None, use_errno=True)
    _libc.mmap.restype = ctypes.c_void_p
    _libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    _libc.msync.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    _libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]

    def __init__(self, path: Path, size: int):
        self.fd: int | None = os.open(path, os.O_RDWR)
        address = self._libc.mmap(None, size, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_SHARED, self.fd, 0)
        if address in (None, ctypes.c_void_p(-1).value):
            os.close(self.fd)
            raise OSError(ctypes.get_errno(), "mmap")
        self.address: int | None = address
        self.size = size

    def __enter__(self) -> SharedMapping:
        return self

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(OSError):
            self.close()
        self.munmap()

    def write(self, offset: int, data: bytes) -> None:
        assert self.address is not None and offset + len(data) <= self.size
        ctypes.memmove(self.address + offset, data, len(data))

    def msync(self, offset: int, length: int) -> None:
        assert self.address is not None
        if self._libc.msync(self.address + offset, length, 4):  # MS_SYNC
            raise OSError(ctypes.get_errno(), "msync")

    def close(self) -> None:
        """close(2) the descriptor (FUSE's FLUSH: a CLEANUP); the mapping stays."""
        fd, self.fd = self.fd, None
        if fd is not None:
            os.close(fd)

    def munmap(self) -> None:
        address, self.address = self.address, None
        if address is not None and self._libc.munmap(address, self.size):
            raise OSError(ctypes.get_errno(), "munmap")


def test_mmap_writes_are_scanned_when_the_kernel_writes_them_back(
    vol: MountedVolume, serve: Callable[..., Service], wait_for: Callable[..., Any]
) -> None:
    """A page of a shared mapping carrying the pattern goes down as a WRITE when the kernel writes it back: msync
    fails with EACCES, or close(2) with EIO (it writes dirty pages back first; the kernel reports any failed
    write-back so). The refused page never reaches the disk, and later opens read the file's data, not the
    page the kernel kept."""
    service = serve()
    dots = b"." * 8192
    put(vol, "mapped.txt", dots)
    put(vol, "closed.txt", dots)
    with SharedMapping(mnt(vol, "mapped.txt"), 8192) as mapped:
        mapped.write(5000, EICAR)
        with pytest.raises(OSError) as excinfo:
            mapped.msync(0, 8192)
        assert excinfo.value.errno == errno.EACCES
        assert cat(mnt(vol, "mapped.txt")).stdout == dots
    with SharedMapping(mnt(vol, "closed.txt"), 8192) as mapped:
        mapped.write(5000, EICAR)
        with pytest.raises(OSError) as excinfo:
            mapped.close()
        assert excinfo.value.errno == errno.EIO
        assert cat(mnt(vol, "closed.txt")).stdout == dots  # scanned again: the refused WRITE dropped the verdict
    wait_for(lambda: "clean release /closed.txt" in service.verdicts(), "the rescan at RELEASE (sent after munmap)")
    for name in ("mapped.txt", "closed.txt"):
        assert (Path(vol.backing) / name).read_bytes() == dots
        assert cat(mnt(vol, name)).stdout == dots
    assert service.verdicts() == [
        "clean open /mapped.txt",
        "INFECTED write /mapped.txt: EICAR-Test-File",
        "clean close /mapped.txt",  # the handle wrote (tried to): rescanned, what the disk has is clean
        "clean open /closed.txt",
        "INFECTED write /closed.txt: EICAR-Test-File",  # no FLUSH: close(2) failed first
        "clean open /closed.txt",
        "clean release /closed.txt",
    ]


def test_mmap_writes_after_the_descriptor_is_closed_are_scanned(
    vol: MountedVolume, serve: Callable[..., Service], wait_for: Callable[..., Any]
) -> None:
    """Windows-driver-samples #1371: pages of a shared mapping written after close(2) reach the file system after
    its CLEANUP (FUSE's FLUSH), when munmap writes them back; then the RELEASE follows, and no CLEANUP. A page
    carrying the pattern is refused as a WRITE; a pattern split across two pages written back one at a time
    passes both WRITEs and is found by the rescan at the handle's CLOSE (RELEASE)."""
    service = serve()
    put(vol, "mapped/whole.txt", b"." * 8192)
    put(vol, "mapped/split.txt", b"." * 8192)
    with SharedMapping(mnt(vol, "mapped/whole.txt"), 8192) as mapped:
        mapped.close()  # FLUSH (CLEANUP): nothing written yet
        mapped.write(5000, EICAR)
        mapped.munmap()  # the dirty page goes down as a WRITE, refused; then RELEASE
    wait_for(lambda: "clean release /mapped/whole.txt" in service.verdicts(), "the rescan at RELEASE")
    assert cat(mnt(vol, "mapped/whole.txt")).stdout == b"." * 8192  # not the page the kernel kept
    with SharedMapping(mnt(vol, "mapped/split.txt"), 8192) as mapped:
        mapped.close()
        mapped.write(4096 - 30, EICAR[:30])
        mapped.msync(0, 4096)  # the first page only: a WRITE with the first half
        mapped.write(4096, EICAR[30:])
        mapped.munmap()  # a WRITE of the second page with the second half, then RELEASE
    rescanned = "INFECTED release /mapped/split.txt: EICAR-Test-File"
    wait_for(lambda: rescanned in service.verdicts(), "the rescan at RELEASE")
    assert (Path(vol.backing) / "mapped/whole.txt").read_bytes() == b"." * 8192
    assert (Path(vol.backing) / "mapped/split.txt").read_bytes()[4096 - 30 : 4096 + len(EICAR) - 30] == EICAR
    assert service.verdicts() == [
        "clean open /mapped/whole.txt",
        "INFECTED write /mapped/whole.txt: EICAR-Test-File",
        "clean release /mapped/whole.txt",  # the handle wrote (tried to): rescanned, the disk has the dots
        "clean open /mapped/split.txt",
        "clean write /mapped/split.txt",
        "clean write /mapped/split.txt",
        rescanned,
    ]
    assert denied(cat(mnt(vol, "mapped/split.txt")))


def test_truncating_and_appending_opens(vol: MountedVolume, serve: Callable[..., Service]) -> None:
    """O_WRONLY|O_TRUNC of an infected file is allowed (it empties it; nothing is read); a pattern written through
    an O_TRUNC handle or appended in halves, by one O_APPEND handle or by two processes' `>>`, is found at the
    close of the handle that completed it."""
    service = serve()
    put(vol, "trunc/infected.txt", EICAR)
    put(vol, "trunc/clean.txt", CLEAN)
    with open(mnt(vol, "trunc/infected.txt"), "wb") as f:  # O_WRONLY|O_CREAT|O_TRUNC
        f.write(CLEAN)
    assert cat(mnt(vol, "trunc/infected.txt")).stdout == CLEAN
    fd = os.open(mnt(vol, "trunc/clean.txt"), os.O_WRONLY | os.O_TRUNC)
    os.write(fd, EICAR[:30])
    os.write(fd, EICAR[30:])
    os.close(fd)
    fd = os.open(mnt(vol, "trunc/append.txt"), os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    os.write(fd, CLEAN + EICAR[:30])
    os.write(fd, EICAR[30:])
    os.close(fd)
    env = {**os.environ, "FIRST": EICAR[:30].decode(), "SECOND": EICAR[30:].decode()}
    for half in ("FIRST", "SECOND"):
        appended = ["sh", "-c", f'printf "%s" "${half}" >> "$1"', "sh", str(mnt(vol, "trunc/shell.txt"))]
        subprocess.run(appended, env=env, check=True)
    for name in ("clean.txt", "append.txt", "shell.txt"):
        assert EICAR in (Path(vol.backing) / "trunc" / name).read_bytes(), name
        assert denied(cat(mnt(vol, f"trunc/{name}"))), name
    assert service.verdicts() == [
        "clean write /trunc/infected.txt",
        "clean close /trunc/infected.txt",  # the next open: from this verdict
        "clean write /trunc/clean.txt",
        "clean write /trunc/clean.txt",
        "INFECTED close /trunc/clean.txt: EICAR-Test-File",
        "clean write /trunc/append.txt",
        "clean write /trunc/append.txt",
        "INFECTED close /trunc/append.txt: EICAR-Test-File",
        "clean write /trunc/shell.txt",
        "clean close /trunc/shell.txt",
        "clean write /trunc/shell.txt",
        "INFECTED close /trunc/shell.txt: EICAR-Test-File",
    ]


def test_renames_links_and_changes_behind_the_mount_never_serve_a_stale_clean_verdict(
    vol: MountedVolume, serve: Callable[..., Service]
) -> None:
    """Each clean file is opened first, so its clean verdict is cached; then an infected file takes its place
    (renamed over it through the mount or on the backing volume) or its data changes on the backing volume
    (same size, mtime put back). Hard links to an infected file are refused by every name."""
    service = serve()
    backing = Path(vol.backing) / "stale"
    dashes = b"-" * len(EICAR)
    for name in ("mv.txt", "replaced.txt", "edited.txt", "linked.txt"):
        put(vol, f"stale/{name}", dashes)
        assert cat(mnt(vol, f"stale/{name}")).stdout == dashes
        assert cat(mnt(vol, f"stale/{name}")).stdout == dashes  # from the cache
    put(vol, "stale/incoming.tmp", EICAR)
    subprocess.run(["mv", str(mnt(vol, "stale/incoming.tmp")), str(mnt(vol, "stale/mv.txt"))], check=True)
    put(vol, "stale/incoming.tmp", EICAR)
    os.replace(backing / "incoming.tmp", backing / "replaced.txt")
    before = os.stat(backing / "edited.txt")
    fd = os.open(backing / "edited.txt", os.O_WRONLY)
    os.pwrite(fd, EICAR, 0)
    os.close(fd)
    os.utime(backing / "edited.txt", ns=(before.st_atime_ns, before.st_mtime_ns))
    os.link(backing / "replaced.txt", backing / "alias-on-backing.txt")
    os.link(mnt(vol, "stale/mv.txt"), mnt(vol, "stale/alias-on-mount.txt"))
    os.link(mnt(vol, "stale/linked.txt"), mnt(vol, "stale/linked-alias.txt"))
    fd = os.open(mnt(vol, "stale/linked-alias.txt"), os.O_WRONLY)  # the other name: clean halves, then the close
    os.write(fd, EICAR[:30])
    os.write(fd, EICAR[30:])
    os.close(fd)
    # The kernel still maps the name replaced.txt to the file it replaced (it caches names for entry_timeout;
    # a change on the backing volume does not reach it): that file's clean data, or a refusal, never EICAR.
    assert cat(mnt(vol, "stale/replaced.txt")).stdout in (dashes, b"")
    for name in (
        "mv.txt",
        "edited.txt",
        "alias-on-backing.txt",
        "alias-on-mount.txt",
        "linked.txt",
        "linked-alias.txt",
    ):
        assert denied(cat(mnt(vol, f"stale/{name}"))), name
    assert "INFECTED open /stale/alias-on-backing.txt: EICAR-Test-File" in service.verdicts()
    assert "INFECTED open /stale/edited.txt: EICAR-Test-File" in service.verdicts()


def test_the_service_reading_its_rules_from_the_mount_is_not_scanned(
    vol: MountedVolume, serve: Callable[..., Service], tmp_path: Path, wait_for: Callable[..., Any]
) -> None:
    """No self-deadlock: the service (one worker thread) reloads its rules from a file on the mount while it
    serves it. Were its own opens scanned, the reload would wait for a verdict only the service can give (the
    reload holds the engine's lock the worker needs) and, with Policy=deny, fail after ScanTimeout."""
    put(vol, "rules/foul.rules", PatternEngine.DEFAULT_RULES.read_bytes() + b"Foul-Word = text:foul\n")
    put(vol, "rules/foul.txt", b"a foul word\n")
    log_start = len(vol.log_text())
    rules = tmp_path / "scanner.rules"
    rules.symlink_to(PatternEngine.DEFAULT_RULES)  # read before it connects: not from the mount
    service = serve("--threads", "1", "--rules", str(rules))
    assert cat(mnt(vol, "rules/foul.txt")).stdout == b"a foul word\n"
    switch = tmp_path / "switch"
    switch.symlink_to(mnt(vol, "rules/foul.rules"))
    switch.replace(rules)
    wait_for(lambda: "signature database changed" in service.log_text(), "the service to load its rules from the mount")
    assert denied(cat(mnt(vol, "rules/foul.txt")))
    assert service.verdicts() == ["clean open /rules/foul.txt", "INFECTED open /rules/foul.txt: Foul-Word"]
    assert "no verdict" not in vol.log_text()[log_start:] and "engine:" not in service.log_text()


def test_a_large_scan_does_not_hold_up_other_io(
    vol: MountedVolume, serve: Callable[..., Service], tmp_path: Path, wait_for: Callable[..., Any]
) -> None:
    """While a 64 MiB file is scanned (slowly: twenty rules, each a pass over the data), another process lists a
    directory and reads a small file, which needs a scan of its own, and is done before the large open is."""
    service = serve("--rules", str(slow_rules(tmp_path / "slow.rules")))
    put(vol, "large/big.bin", NOISE)
    put(vol, "large/small.txt", CLEAN)
    opener = start_opener(mnt(vol, "large/big.bin"))
    wait_for(lambda: blocked_in_fuse(opener.pid), "the large open to wait for the daemon")
    start = time.monotonic()
    listing = subprocess.run(["ls", "-l", str(mnt(vol, "large"))], capture_output=True, text=True, check=True)
    small = cat(mnt(vol, "large/small.txt"))
    done = time.monotonic()
    big = opener.outcome(timeout=60)
    assert "big.bin" in listing.stdout and small.stdout == CLEAN
    assert big["errno"] == 0
    assert big["start"] < start and done < big["end"], (big, start, done)
    assert service.verdicts() == ["clean open /large/small.txt", "clean open /large/big.bin"]


@pytest.mark.parametrize("policy", ["deny", "allow"])
def test_a_service_killed_mid_scan_gets_the_policy_at_once(
    request: pytest.FixtureRequest,
    policy: str,
    serve: Callable[..., Service],
    tmp_path: Path,
    wait_for: Callable[..., Any],
) -> None:
    on: MountedVolume = request.getfixturevalue("vol" if policy == "deny" else "allow_vol")
    timeout = TIMEOUT if policy == "deny" else ALLOW_TIMEOUT
    service = serve("--rules", str(slow_rules(tmp_path / "slow.rules")), on=on)
    put(on, "killed/big.bin", NOISE)
    put(on, "killed/clean.txt", CLEAN)

    def bytes_read() -> int:
        (line,) = [
            line for line in Path(f"/proc/{service.pid}/io").read_text().splitlines() if line.startswith("rchar:")
        ]
        return int(line.split()[1])

    before = bytes_read()
    opener = start_opener(mnt(on, "killed/big.bin"))
    wait_for(lambda: bytes_read() > before + (4 << 20), "the service to be reading the file")
    service.signal(signal.SIGKILL)
    killed = time.monotonic()
    big = opener.outcome(timeout=60)
    assert big["errno"] == (errno.EACCES if policy == "deny" else 0)
    assert big["end"] - killed < timeout / 4, "the policy waited for the timeout"
    assert re.search(r"scanner: no verdict for /killed/big\.bin: .*disconnected", on.log_text())
    # Nothing hangs: the mount answers, and with no service the policy decides at once.
    assert "clean.txt" in os.listdir(mnt(on, "killed"))
    wait_for(lambda: disconnected(on, service), "the filter to see the service gone")
    before_open = time.monotonic()
    if policy == "deny":
        assert denied(cat(mnt(on, "killed/clean.txt")))
    else:
        assert cat(mnt(on, "killed/clean.txt")).stdout == CLEAN
        assert "scanner: open of /killed/clean.txt allowed without a verdict (Policy=allow)" in on.log_text()
    assert time.monotonic() - before_open < timeout / 4
    serve(on=on)
    assert cat(mnt(on, "killed/clean.txt")).stdout == CLEAN


def test_a_stopped_service_costs_an_open_the_timeout_then_the_policy(
    allow_vol: MountedVolume, serve: Callable[..., Service]
) -> None:
    """A hung service (SIGSTOP): the open waits ScanTimeout, then Policy=allow lets it through and the daemon
    logs it; a timeout is never taken for a verdict (the late reply is dropped) and nothing else waits."""
    service = serve(on=allow_vol)
    put(allow_vol, "hung/a.txt", CLEAN)
    put(allow_vol, "hung/b.log", EICAR)  # not a scanned extension: no scan, so no wait
    service.signal(signal.SIGSTOP)
    opener = start_opener(mnt(allow_vol, "hung/a.txt"))
    assert cat(mnt(allow_vol, "hung/b.log")).stdout == EICAR
    result = opener.outcome(timeout=60)
    assert result["errno"] == 0
    assert ALLOW_TIMEOUT - 0.1 <= result["end"] - result["start"] < ALLOW_TIMEOUT + 3, result
    assert f"scanner: no verdict for /hung/a.txt within {ALLOW_TIMEOUT} s" in allow_vol.log_text()
    service.signal(signal.SIGCONT)
    assert cat(mnt(allow_vol, "hung/a.txt")).stdout == CLEAN  # judged now, no longer waiting
    assert service.verdicts() == ["clean open /hung/a.txt", "clean open /hung/a.txt"]


def test_with_no_service_policy_allow_opens_everything(allow_vol: MountedVolume) -> None:
    """The scanner sample's accept (5): no scanuser, everything opens; the daemon logs each unjudged open."""
    put(allow_vol, "noservice/eicar.com", EICAR)
    assert cat(mnt(allow_vol, "noservice/eicar.com")).stdout == EICAR
    mnt(allow_vol, "noservice/new.txt").write_bytes(EICAR)
    assert cat(mnt(allow_vol, "noservice/new.txt")).stdout == EICAR
    log = allow_vol.log_text()
    for what in ("open of /noservice/eicar.com", "write of /noservice/new.txt", "open of /noservice/new.txt"):
        assert f"scanner: {what} allowed without a verdict (Policy=allow)" in log, what


def test_files_whose_extension_is_not_listed_are_not_scanned(
    allow_vol: MountedVolume, serve: Callable[..., Service]
) -> None:
    """The scanner sample's accept (4): with Extensions listing txt but not log, b.log with the pattern opens and
    takes a written pattern; b.txt does neither."""
    service = serve(on=allow_vol)
    put(allow_vol, "ext/b.log", EICAR)
    put(allow_vol, "ext/b.txt", EICAR)
    assert cat(mnt(allow_vol, "ext/b.log")).stdout == EICAR
    mnt(allow_vol, "ext/c.log").write_bytes(EICAR)
    assert denied(cat(mnt(allow_vol, "ext/b.txt")))
    with pytest.raises(PermissionError):
        mnt(allow_vol, "ext/c.txt").write_bytes(EICAR)
    assert service.verdicts() == [
        "INFECTED open /ext/b.txt: EICAR-Test-File",
        "INFECTED write /ext/c.txt: EICAR-Test-File",
    ]


def test_quarantine_moves_an_infected_file_aside_on_the_mount(
    allow_vol: MountedVolume, serve: Callable[..., Service]
) -> None:
    service = serve(on=allow_vol)
    put(allow_vol, "q/eicar.com", EICAR)
    put(allow_vol, "q/clean.txt", CLEAN)
    ino = os.stat(Path(allow_vol.backing) / "q/eicar.com").st_ino
    assert denied(cat(mnt(allow_vol, "q/eicar.com")))
    # written through the mount in two clean halves: infected at close, and quarantined then
    fd = os.open(mnt(allow_vol, "q/split.txt"), os.O_WRONLY | os.O_CREAT)
    split_ino = os.fstat(fd).st_ino
    os.write(fd, EICAR[:30])
    os.write(fd, EICAR[30:])
    os.close(fd)
    assert sorted(os.listdir(mnt(allow_vol, "q"))) == ["clean.txt"]
    assert not mnt(allow_vol, "q/eicar.com").exists()  # the kernel forgot the old name too
    quarantine = mnt(allow_vol, ".quarantine")
    assert {f"{ino}-eicar.com", f"{split_ino}-split.txt"} <= set(os.listdir(quarantine))
    assert (Path(allow_vol.backing) / ".quarantine" / f"{ino}-eicar.com").read_bytes() == EICAR
    assert denied(cat(quarantine / f"{ino}-eicar.com"))  # still refused where it is now
    assert cat(mnt(allow_vol, "q/clean.txt")).stdout == CLEAN
    assert "scanner: /q/eicar.com quarantined as .quarantine/" in allow_vol.log_text()
    assert service.verdicts()[:1] == ["INFECTED open /q/eicar.com: EICAR-Test-File"]


def test_the_service_with_no_arguments_protects_a_scanner_volume(
    vol: MountedVolume, serve: Callable[..., Service]
) -> None:
    """``fltfuse-scanner`` as installed, started with no arguments anywhere: it finds the volume's port itself."""
    service = serve(command=[str(Path(sys.executable).with_name("fltfuse-scanner"))])
    put(vol, "noargs/eicar.com", EICAR)
    put(vol, "noargs/clean.txt", CLEAN)
    assert denied(cat(mnt(vol, "noargs/eicar.com")))
    assert cat(mnt(vol, "noargs/clean.txt")).stdout == CLEAN
    assert "serving every volume" in service.log_text()
    assert service.verdicts() == ["INFECTED open /noargs/eicar.com: EICAR-Test-File"]  # clean ones: with -v only


# -- the ClamAV engine ------------------------------------------------------------------------------------------


def test_clamav_verdicts_through_the_mount_agree_with_clamscan(
    vol: MountedVolume, serve: Callable[..., Service], tmp_path: Path
) -> None:
    files = clamav_samples(NOISE[: 3 << 20])
    # a body pattern in the middle of 8 MiB, across the filter's 1 MiB reads and the engine's INSTREAM chunks
    files["large-pattern.bin"] = NOISE[: (4 << 20) - 9] + TEST_PATTERN + NOISE[4 << 20 : 8 << 20]
    for name, content in files.items():
        put(vol, f"clamav/{name}", content)
    with running_clamd(tmp_path / "clamd", stream_max_length="16M") as clamd:
        engine = ["--engine", "clamav", "--clamd-socket", str(clamd.socket), "--clamd-database", str(clamd.database)]
        service = serve(*engine)
        through_mount: dict[str, str | None] = {}
        for name in files:
            done = cat(mnt(vol, f"clamav/{name}"))
            if done.returncode == 0:
                assert done.stdout == files[name]
                through_mount[name] = None
            else:
                assert denied(done), done
                (line,) = [v for v in service.verdicts() if v.startswith(f"INFECTED open /clamav/{name}: ")]
                through_mount[name] = line.partition(": ")[2]
        backing = Path(vol.backing) / "clamav"
        expected = clamscan_verdicts([backing / name for name in files], clamd.database)
        assert through_mount == {path.name: verdict for path, verdict in expected.items()}
        assert sum(v is not None for v in through_mount.values()) == 5, through_mount
        assert through_mount["large-pattern.bin"] == TEST_PATTERN_SIGNATURE
        source = tmp_path / "pattern.bin"
        source.write_bytes(files["pattern.bin"])
        copy = subprocess.run(["cp", str(source), str(mnt(vol, "clamav/copied.bin"))], capture_output=True)
        assert copy.returncode != 0 and b"Permission denied" in copy.stderr
        assert (backing / "copied.bin").read_bytes() == b""


def test_a_bad_parameter_fails_the_mount_with_a_message_naming_it(tmp_path: Path) -> None:
    """filter_load runs in the daemon's trio loop at mount: its failure still reaches `fltfuse mount` as
    one clear message (not a nursery's exception group), and nothing stays mounted or attached."""
    image = tmp_path / "bad.img"
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    subprocess.run([sys.executable, "-m", "fltfuse", "volume", "create", str(image), "--size", "64M"], check=True)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "fltfuse",
            "mount",
            f"--log-file={tmp_path / 'daemon.log'}",
            str(image),
            str(mountpoint),
            "--filter",
            "scanner",
            "--param",
            "scanner.Policy=maybe",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode != 0
    assert "parameter Policy is 'maybe': use allow or deny" in done.stderr, done.stderr
    assert "Exceptions from Trio nursery" not in done.stderr
    assert not os.path.ismount(mountpoint)
    assert not subprocess.run(["losetup", "-j", str(image)], capture_output=True, text=True).stdout.strip()
