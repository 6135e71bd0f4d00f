"""The scanner sample in-process, with its real service: a ``fltfuse-scanner`` process (pattern or ClamAV engine)
serving the volume's ``ScannerPort``.

Every test starts its own service (``tests.scanner_service``: each scan it judged is one line of its log); the
filter's own counters are ``Filter.data.stats``.
"""

from __future__ import annotations

import array
import contextlib
import errno
import logging
import os
import random
import signal
import socket
import threading
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import Any

import pytest
import trio

from filters.scanner import ScannerData, protocol
from filters.scanner.engines import PatternEngine, eicar
from fltfuse import FileInformationClass, FileObject, Requestor, SetAttributesParameters
from fltfuse._callback_data import CallbackData
from fltfuse._port.wire import Frame, FrameKind, encode
from fltfuse._stack import StackError
from fltfuse.port import connect_communication_port, open_filter_port
from fltfuse.testing import InProcessVolume
from fltfuse.testing.in_process import _Caller
from tests.clamd import TEST_PATTERN, clamscan_verdicts, running_clamd
from tests.scanner_service import CLEAN, Service, clamav_samples

EICAR = eicar()
# incompressible filler without a byte below 0x80, so free of every (ASCII) pattern used here
NOISE = random.Random(5).randbytes(1 << 20).translate(bytes(range(0x80, 0x100)) * 2)


async def until(condition: Callable[[], Any], what: str, timeout: float = 15.0) -> Any:
    """Poll ``condition`` (letting the volume's tasks run) until it is truthy; fail after ``timeout`` seconds."""
    deadline = trio.current_time() + timeout
    while not (value := condition()):
        if trio.current_time() > deadline:
            pytest.fail(f"timed out after {timeout:g} s waiting for {what}")
        await trio.sleep(0.01)
    return value


def data_of(vol: InProcessVolume) -> ScannerData:
    data: ScannerData = vol.filters[0].data
    return data


class Bench:
    """Volumes with the scanner attached, and services serving them; everything is closed after the test."""

    def __init__(self, tmp_path: Path):
        self.tmp_path = tmp_path
        self.volumes: list[InProcessVolume] = []
        self.services: list[Service] = []

    def volume(self, files: Mapping[str, bytes] = {}, **params: str) -> InProcessVolume:
        """A volume of a fresh directory holding ``files``; ``params`` override the scanner's INF parameters."""
        directory = self.tmp_path / f"vol-{len(self.volumes)}"
        directory.mkdir()
        for name, content in files.items():
            (directory / name).write_bytes(content)
        vol = InProcessVolume(directory, ["scanner"], parameters={"scanner": params})
        self.volumes.append(vol)
        return vol

    def start(self, vol: InProcessVolume, *args: str) -> Service:
        """Start a service for ``vol``'s port (``-v``: it logs clean verdicts too); do not wait for it."""
        log = self.tmp_path / f"service-{len(self.services)}.log"
        service = Service.start(["--port", vol.port_path(protocol.PORT_NAME), *args], log)
        self.services.append(service)
        return service

    async def serve(self, vol: InProcessVolume, *args: str) -> Service:
        """Start a service for ``vol`` and wait until the filter has it connected."""
        service = self.start(vol, *args)
        data = data_of(vol)
        await until(lambda: data.client is not None and data.client.pid == service.pid, "the service to connect")
        return service

    async def close(self) -> None:
        for service in self.services:
            service.stop()
        for vol in self.volumes:
            if vol.stack.instances:
                await vol.aclose()


@pytest.fixture
async def bench(tmp_path: Path) -> AsyncIterator[Bench]:
    made = Bench(tmp_path)
    try:
        yield made
    finally:
        await made.close()


def denied(excinfo: pytest.ExceptionInfo[OSError]) -> bool:
    return excinfo.value.errno == errno.EACCES


async def write_through(vol: InProcessVolume, path: str, *pieces: bytes, flags: int = os.O_WRONLY) -> None:
    """open(2) ``path`` (created if missing), one write(2) per piece, close(2)."""
    handle = await vol.open(path, flags | os.O_CREAT)
    try:
        offset = 0
        for piece in pieces:
            offset += await vol.write(handle, offset, piece)
    finally:
        await vol.close_handle(handle)


# -- scanning on open and on write ------------------------------------------------------------------------------


async def test_a_clean_file_opens_and_its_second_open_sends_no_scan(bench: Bench) -> None:
    vol = bench.volume({"clean.txt": CLEAN, "empty.txt": b""})
    service = await bench.serve(vol)
    data = data_of(vol)
    assert await vol.read_file("clean.txt") == CLEAN
    assert (data.stats["scans"], data.stats["cache_hits"]) == (1, 0)
    assert await vol.read_file("clean.txt") == CLEAN
    assert (data.stats["scans"], data.stats["cache_hits"]) == (1, 1)
    assert await vol.read_file("empty.txt") == b""  # nothing to scan
    assert service.verdicts() == ["clean open /clean.txt"]
    assert data.stats["scans"] == 1


async def test_an_infected_file_cannot_be_opened_and_the_service_logs_it(bench: Bench) -> None:
    vol = bench.volume({"eicar.txt": EICAR, "buried.bin": NOISE[:300_000] + EICAR + NOISE[:5000]})
    service = await bench.serve(vol)
    data = data_of(vol)
    for name in ("eicar.txt", "buried.bin", "eicar.txt"):  # the second eicar.txt: from the verdict cache
        with pytest.raises(OSError) as excinfo:
            await vol.read_file(name)
        assert denied(excinfo)
    assert service.verdicts() == [
        "INFECTED open /eicar.txt: EICAR-Test-File",
        "INFECTED open /buried.bin: EICAR-Test-File",
    ]
    assert dict(data.stats) == {"scans": 2, "infected": 3, "denied": 3, "cache_hits": 1}
    # Opening for writing only reads nothing: not scanned, allowed (the writes are scanned).
    handle = await vol.open("eicar.txt", os.O_WRONLY)
    await vol.close_handle(handle)
    assert (vol.directory / "eicar.txt").read_bytes() == EICAR


async def test_an_infected_write_fails_and_its_data_never_reaches_the_file(bench: Bench) -> None:
    vol = bench.volume()
    service = await bench.serve(vol)
    handle = await vol.open("new.txt", os.O_RDWR | os.O_CREAT)
    try:
        assert await vol.write(handle, 0, CLEAN) == len(CLEAN)
        for infected in (EICAR, NOISE[:100_000] + EICAR + NOISE[:100]):
            with pytest.raises(OSError) as excinfo:
                await vol.write(handle, len(CLEAN), infected)
            assert denied(excinfo)
            assert (vol.directory / "new.txt").read_bytes() == CLEAN
        assert await vol.write(handle, len(CLEAN), b"more\n") == 5  # the handle still works
    finally:
        await vol.close_handle(handle)
    assert await vol.read_file("new.txt") == CLEAN + b"more\n"
    assert service.verdicts() == [
        "clean write /new.txt",
        "INFECTED write /new.txt: EICAR-Test-File",
        "INFECTED write /new.txt: EICAR-Test-File",
        "clean write /new.txt",
        "clean close /new.txt",  # the handle wrote: rescanned at close
    ]


@pytest.mark.parametrize("flags", [os.O_WRONLY, os.O_RDWR], ids=["write-only", "read-write"])
async def test_a_pattern_split_across_writes_makes_the_file_unopenable_at_close(bench: Bench, flags: int) -> None:
    vol = bench.volume()
    service = await bench.serve(vol)
    data = data_of(vol)
    await write_through(vol, "split.txt", EICAR[:30], EICAR[30:], flags=flags)  # each write(2) succeeds
    assert (vol.directory / "split.txt").read_bytes() == EICAR
    assert service.verdicts() == [
        "clean write /split.txt",
        "clean write /split.txt",
        "INFECTED close /split.txt: EICAR-Test-File",
    ]
    scans = data.stats["scans"]
    with pytest.raises(OSError) as excinfo:
        await vol.read_file("split.txt")
    assert denied(excinfo)
    assert data.stats["scans"] == scans and data.stats["cache_hits"] == 1  # the verdict of the close


async def test_with_scan_writes_off_only_the_close_finds_an_infected_write(bench: Bench) -> None:
    vol = bench.volume(ScanWrites="0")
    service = await bench.serve(vol)
    await write_through(vol, "new.txt", CLEAN, EICAR)
    assert (vol.directory / "new.txt").read_bytes() == CLEAN + EICAR
    with pytest.raises(OSError) as excinfo:
        await vol.read_file("new.txt")
    assert denied(excinfo)
    assert service.verdicts() == ["INFECTED close /new.txt: EICAR-Test-File"]


async def test_every_close_of_a_handle_that_wrote_rescans_it(bench: Bench) -> None:
    """A handle closed twice (a dup'd descriptor, or one a child inherited, closed first): each close(2) is a
    CLEANUP, and what was written after the first is rescanned at the second."""
    vol = bench.volume()
    service = await bench.serve(vol)
    handle = await vol.open("twice.txt", os.O_WRONLY | os.O_CREAT)
    try:
        await vol.write(handle, 0, EICAR[:30])
        await vol._call("twice.txt", "flush", handle)  # close(2) of a duplicate: CLEANUP, the handle stays
        await vol.write(handle, 30, EICAR[30:])
    finally:
        await vol.close_handle(handle)
    assert service.verdicts() == [
        "clean write /twice.txt",
        "clean close /twice.txt",
        "clean write /twice.txt",
        "INFECTED close /twice.txt: EICAR-Test-File",
    ]
    with pytest.raises(OSError) as excinfo:
        await vol.read_file("twice.txt")
    assert denied(excinfo)


async def test_writes_after_the_last_cleanup_are_rescanned_at_close(bench: Bench) -> None:
    """A handle written after its last CLEANUP (a shared mapping's pages written back after close(2)) is rescanned
    at its CLOSE (RELEASE): the coverage hole of Windows-driver-samples #1371, with ScanWrites=0 the only scan."""
    vol = bench.volume(ScanWrites="0", Quarantine=".quarantine")
    service = await bench.serve(vol)
    handle = await vol.open("mapped.txt", os.O_RDWR | os.O_CREAT)
    ino = os.stat(vol.directory / "mapped.txt").st_ino
    await vol.write(handle, 0, CLEAN)
    await vol._call("mapped.txt", "flush", handle)  # close(2): CLEANUP, the mapping keeps the handle
    await vol.write(handle, len(CLEAN), EICAR)  # munmap writes the page back
    await vol._call("mapped.txt", "release", handle)  # no CLEANUP before the CLOSE
    assert service.verdicts() == ["clean close /mapped.txt", "INFECTED release /mapped.txt: EICAR-Test-File"]
    assert os.listdir(vol.directory / ".quarantine") == [f"{ino}-mapped.txt"]
    handle = await vol.open("other.txt", os.O_RDWR | os.O_CREAT)  # written before its CLEANUP: rescanned once
    await vol.write(handle, 0, CLEAN)
    await vol.close_handle(handle)
    assert service.verdicts()[2:] == ["clean close /other.txt"]


async def test_quarantine_never_replaces_a_file_and_fits_long_names(bench: Bench) -> None:
    """Two links with one name, in two directories, whose ``<ino>-<name>`` an earlier file with the same inode
    number holds: they go to ``<ino>-2-<name>`` and ``<ino>-3-<name>``, and the earlier file stays. A 250-byte
    name loses bytes from its front and keeps its end."""
    vol = bench.volume(Quarantine=".quarantine")
    for directory in ("a", "b", ".quarantine"):
        (vol.directory / directory).mkdir()
    (vol.directory / "a" / "eicar.com").write_bytes(EICAR)
    os.link(vol.directory / "a" / "eicar.com", vol.directory / "b" / "eicar.com")
    ino = os.stat(vol.directory / "a" / "eicar.com").st_ino
    earlier = vol.directory / ".quarantine" / f"{ino}-eicar.com"
    earlier.write_bytes(b"an earlier file")
    long_name = "x" * 246 + ".txt"
    (vol.directory / long_name).write_bytes(EICAR)
    long_ino = os.stat(vol.directory / long_name).st_ino
    await bench.serve(vol)
    for path in ("a/eicar.com", "b/eicar.com", long_name):
        with pytest.raises(OSError) as excinfo:
            await vol.read_file(path)
        assert denied(excinfo)
    prefix = f"{long_ino}-"
    cut = prefix + long_name[-(255 - len(prefix)) :]
    assert len(cut) == 255
    expected = [earlier.name, f"{ino}-2-eicar.com", f"{ino}-3-eicar.com", cut]
    assert sorted(os.listdir(vol.directory / ".quarantine")) == sorted(expected)
    assert earlier.read_bytes() == b"an earlier file"
    assert sorted(os.listdir(vol.directory)) == [".quarantine", "a", "b"]  # every infected name moved


# -- the verdict cache ------------------------------------------------------------------------------------------


async def truncate(vol: InProcessVolume, path: str, size: int) -> None:
    """truncate(2) by path: SET_INFORMATION (END_OF_FILE) without a handle."""
    cbd = CallbackData(
        FileObject(await vol.lookup(path)),
        SetAttributesParameters(FileInformationClass.END_OF_FILE, size=size),
        Requestor(os.getpid(), os.geteuid(), os.getegid(), 0o022),
    )
    await vol.stack.dispatch(cbd)
    assert cbd.io_status.status == 0


async def test_a_write_drops_the_verdict_at_once_and_the_close_rescans(bench: Bench) -> None:
    vol = bench.volume({"a.txt": CLEAN})
    service = await bench.serve(vol)
    assert await vol.read_file("a.txt") == CLEAN
    writer = await vol.open("a.txt", os.O_WRONLY)
    try:
        await vol.write(writer, len(CLEAN), b"appended\n")
        assert await vol.read_file("a.txt") == CLEAN + b"appended\n"  # an open while the writer is open: rescanned
    finally:
        await vol.close_handle(writer)
    assert await vol.read_file("a.txt") == CLEAN + b"appended\n"  # the close's verdict is cached
    assert service.verdicts() == ["clean open /a.txt", "clean write /a.txt", "clean open /a.txt", "clean close /a.txt"]


async def test_a_truncate_drops_the_verdict(bench: Bench) -> None:
    vol = bench.volume({"a.txt": CLEAN})
    service = await bench.serve(vol)
    await vol.read_file("a.txt")
    await truncate(vol, "a.txt", 7)
    assert await vol.read_file("a.txt") == CLEAN[:7]
    assert await vol.read_file("a.txt") == CLEAN[:7]
    assert service.verdicts() == ["clean open /a.txt", "clean open /a.txt"]
    assert data_of(vol).stats["cache_hits"] == 1


async def test_a_change_behind_the_mount_drops_the_verdict(bench: Bench) -> None:
    """The file is rewritten in place on the backing directory, same size, right after its scan: only its
    ctime (and mtime) tells (fine-grained when the filter has just read them: multigrain timestamps)."""
    clean = b"-" * len(EICAR)
    vol = bench.volume({"a.txt": clean})
    service = await bench.serve(vol)
    assert await vol.read_file("a.txt") == clean
    assert await vol.read_file("a.txt") == clean
    before = os.stat(vol.directory / "a.txt")
    fd = os.open(vol.directory / "a.txt", os.O_WRONLY)
    try:
        os.pwrite(fd, EICAR, 0)
    finally:
        os.close(fd)
    after = os.stat(vol.directory / "a.txt")
    assert after.st_size == before.st_size and after.st_ctime_ns != before.st_ctime_ns
    with pytest.raises(OSError) as excinfo:
        await vol.read_file("a.txt")
    assert denied(excinfo)
    assert service.verdicts() == ["clean open /a.txt", "INFECTED open /a.txt: EICAR-Test-File"]


async def test_a_rename_over_a_cached_name_puts_another_file_there(bench: Bench) -> None:
    vol = bench.volume({"a.txt": CLEAN, "incoming.tmp": EICAR})
    service = await bench.serve(vol)
    assert await vol.read_file("a.txt") == CLEAN
    await vol.rename("incoming.tmp", "a.txt")
    with pytest.raises(OSError) as excinfo:
        await vol.read_file("a.txt")
    assert denied(excinfo)
    assert service.verdicts() == ["clean open /a.txt", "INFECTED open /a.txt: EICAR-Test-File"]


async def test_a_new_signature_database_drops_every_cached_verdict(bench: Bench, tmp_path: Path) -> None:
    rules = tmp_path / "scanner.rules"
    rules.write_bytes(PatternEngine.DEFAULT_RULES.read_bytes())
    vol = bench.volume({"foul.txt": b"a foul word\n", "clean.txt": CLEAN})
    service = await bench.serve(vol, "--rules", str(rules))
    data = data_of(vol)
    for name in ("foul.txt", "clean.txt", "foul.txt"):
        await vol.read_file(name)
    assert (data.stats["scans"], data.stats["cache_hits"], len(data.verdicts)) == (2, 1, 2)
    old = data.fingerprint
    with rules.open("a") as f:
        f.write("Foul-Word = text:foul\n")
    await until(lambda: data.fingerprint != old, "the filter to hear of the new rules")  # the service checks each s
    assert not data.verdicts
    with pytest.raises(OSError) as excinfo:
        await vol.read_file("foul.txt")
    assert denied(excinfo)
    assert await vol.read_file("clean.txt") == CLEAN
    assert service.verdicts() == [
        "clean open /foul.txt",
        "clean open /clean.txt",
        "INFECTED open /foul.txt: Foul-Word",
        "clean open /clean.txt",
    ]
    assert "signature database changed" in service.log_text()


# -- what is scanned --------------------------------------------------------------------------------------------


async def test_only_files_with_the_configured_extensions_are_scanned(bench: Bench) -> None:
    files = {name: EICAR for name in ("a.txt", "B.TXT", "c.log", "noext", "d.txt.bak")}
    vol = bench.volume(files, Extensions="txt, .Cmd")
    service = await bench.serve(vol)
    for name in ("c.log", "noext", "d.txt.bak"):
        assert await vol.read_file(name) == EICAR
    await write_through(vol, "e.log", EICAR)
    for name in ("a.txt", "B.TXT"):
        with pytest.raises(OSError) as excinfo:
            await vol.read_file(name)
        assert denied(excinfo)
    with pytest.raises(OSError) as excinfo:
        await write_through(vol, "f.CMD", EICAR)
    assert denied(excinfo)
    assert service.verdicts() == [
        "INFECTED open /a.txt: EICAR-Test-File",
        "INFECTED open /B.TXT: EICAR-Test-File",
        "INFECTED write /f.CMD: EICAR-Test-File",
    ]


async def test_a_file_name_that_is_not_utf8_is_scanned_and_its_verdict_logged(bench: Bench) -> None:
    name = os.fsdecode(b"caf\xe9-\xff.txt")  # Latin-1 bytes, as an old archive might leave them
    vol = bench.volume({name: EICAR})
    service = await bench.serve(vol)
    with pytest.raises(PermissionError):
        await vol.read_file(name)
    assert service.verdicts() == ["INFECTED open /caf\\udce9-\\udcff.txt: EICAR-Test-File"]
    assert "Logging error" not in service.log.with_suffix(".out").read_text()


async def test_the_service_process_own_requests_are_never_scanned(bench: Bench) -> None:
    vol = bench.volume({"eicar.txt": EICAR})
    service = await bench.serve(vol, "--threads", "2")
    data = data_of(vol)

    def threads() -> list[int]:
        return [int(tid) for tid in os.listdir(f"/proc/{service.pid}/task") if int(tid) != service.pid]

    await until(lambda: len(threads()) >= 3, "the service's port reader and its two workers to start")
    me = vol._caller
    try:
        for pid in (service.pid, *threads()):  # as the kernel names it: the calling thread
            vol._caller = _Caller(pid, me.uid, me.gid, me.umask)
            assert await vol.read_file("eicar.txt") == EICAR
            await write_through(vol, f"from-{pid}.txt", EICAR)
    finally:
        vol._caller = me
    assert data.stats["scans"] == 0 and service.verdicts() == []
    with pytest.raises(OSError) as excinfo:
        await vol.read_file("eicar.txt")
    assert denied(excinfo)


# -- no verdict: no service, a hung one, a dead one -------------------------------------------------------------


async def test_without_a_service_policy_allow_lets_everything_through(bench: Bench) -> None:
    vol = bench.volume({"eicar.txt": EICAR}, Policy="allow")
    assert await vol.read_file("eicar.txt") == EICAR
    await write_through(vol, "new.txt", EICAR)
    assert await vol.read_file("new.txt") == EICAR
    stats = data_of(vol).stats
    assert stats["unscanned"] == 4 and stats["scans"] == 0 and stats["denied"] == 0  # open, write, close, open


async def test_without_a_service_policy_deny_refuses_opens_and_writes(bench: Bench) -> None:
    vol = bench.volume({"clean.txt": CLEAN}, Policy="deny")
    with pytest.raises(OSError) as excinfo:
        await vol.read_file("clean.txt")
    assert denied(excinfo)
    handle = await vol.open("new.txt", os.O_WRONLY | os.O_CREAT)
    try:
        with pytest.raises(OSError) as excinfo:
            await vol.write(handle, 0, CLEAN)
        assert denied(excinfo)
    finally:
        await vol.close_handle(handle)
    assert (vol.directory / "new.txt").read_bytes() == b""
    assert sorted(await vol.listdir()) == ["clean.txt", "new.txt"]  # a listing needs no verdict
    stats = data_of(vol).stats
    assert stats["unscanned"] == 2 and stats["denied"] == 2


async def test_a_hung_service_times_out_and_blocks_nothing_else(bench: Bench) -> None:
    vol = bench.volume({"a.txt": CLEAN, "b.log": CLEAN}, Policy="deny", ScanTimeout="1000", Extensions="txt")
    service = await bench.serve(vol)
    data = data_of(vol)
    service.signal(signal.SIGSTOP)
    outcome: dict[str, Any] = {}

    async def open_a() -> None:
        start = trio.current_time()
        try:
            await vol.read_file("a.txt")
        except OSError as exc:
            outcome["errno"] = exc.errno
        outcome["took"] = trio.current_time() - start

    async with trio.open_nursery() as nursery:
        nursery.start_soon(open_a)
        await until(lambda: data.stats["scans"] == 1, "the scan to be sent")
        assert sorted(await vol.listdir()) == ["a.txt", "b.log"]
        assert await vol.read_file("b.log") == CLEAN
        assert not outcome, "the other requests finished only after the scan"
    assert outcome["errno"] == errno.EACCES
    assert 0.9 <= outcome["took"] < 3, outcome
    assert data.stats["timeouts"] == 1 and data.stats["denied"] == 1
    service.signal(signal.SIGCONT)  # it answers the stale message (dropped) and serves again
    assert await vol.read_file("a.txt") == CLEAN
    assert service.verdicts() == ["clean open /a.txt", "clean open /a.txt"]


@pytest.mark.parametrize("policy", ["allow", "deny"])
async def test_a_service_killed_mid_scan_gets_the_policy_at_once(bench: Bench, policy: str) -> None:
    big = NOISE * 16  # 16 MiB: much more than a pipe holds, so the filter is still feeding it
    vol = bench.volume({"big.bin": big}, Policy=policy, ScanTimeout="30000")
    service = await bench.serve(vol)
    data = data_of(vol)
    service.signal(signal.SIGSTOP)
    outcome: dict[str, Any] = {}

    async def open_big() -> None:
        try:
            outcome["data"] = await vol.read_file("big.bin")
        except OSError as exc:
            outcome["errno"] = exc.errno
        outcome["at"] = trio.current_time()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(open_big)
        await until(lambda: data.stats["scans"] == 1, "the scan to be sent")
        killed = trio.current_time()
        service.signal(signal.SIGKILL)
    assert outcome["at"] - killed < 2, "the policy waited for the timeout"
    if policy == "deny":
        assert outcome == {"errno": errno.EACCES, "at": outcome["at"]}
    else:
        assert outcome["data"] == big
    assert data.stats["failures"] == 1
    await until(lambda: data.client is None, "the filter to see the service gone")
    with pytest.raises(PermissionError) if policy == "deny" else contextlib.nullcontext():
        await vol.read_file("big.bin")
    assert data.stats["unscanned"] == 1


@pytest.mark.parametrize("policy", ["allow", "deny"])
async def test_an_engine_that_cannot_judge_gets_the_policy(bench: Bench, tmp_path: Path, policy: str) -> None:
    """A rules file broken while the service runs: each scan fails (an engine error is never "clean"), the
    service answers an error and the filter applies its Policy; fixed, scans work again."""
    rules = tmp_path / "scanner.rules"
    good = PatternEngine.DEFAULT_RULES.read_bytes()
    rules.write_bytes(good)
    vol = bench.volume({"a.txt": CLEAN, "eicar.txt": EICAR}, Policy=policy)
    service = await bench.serve(vol, "--rules", str(rules))
    data = data_of(vol)
    rules.write_bytes(good + b"Broken = hex:zz\n")
    for name, content in (("a.txt", CLEAN), ("eicar.txt", EICAR)):
        if policy == "allow":
            assert await vol.read_file(name) == content
        else:
            with pytest.raises(PermissionError):
                await vol.read_file(name)
    assert data.stats["failures"] == 2 and data.stats["infected"] == 0 and not data.verdicts
    assert service.log_text().count("scan failed: pattern engine: ") == 2
    rules.write_bytes(good)
    assert await vol.read_file("a.txt") == CLEAN
    with pytest.raises(PermissionError):
        await vol.read_file("eicar.txt")
    assert service.verdicts() == ["clean open /a.txt", "INFECTED open /eicar.txt: EICAR-Test-File"]


# -- quarantine, parameters, the port ---------------------------------------------------------------------------


async def test_quarantine_moves_an_infected_file_aside(bench: Bench) -> None:
    vol = bench.volume({"eicar.txt": EICAR, "clean.txt": CLEAN}, Quarantine=".quarantine")
    await bench.serve(vol)
    root = vol.directory
    found_ino = os.stat(root / "eicar.txt").st_ino
    with pytest.raises(OSError) as excinfo:
        await vol.read_file("eicar.txt")
    assert denied(excinfo)
    handle = await vol.open("split.txt", os.O_WRONLY | os.O_CREAT)
    written_ino = os.stat(root / "split.txt").st_ino
    await vol.write(handle, 0, EICAR[:10])
    await vol.write(handle, 10, EICAR[10:])
    await vol.close_handle(handle)  # infected after the writes: quarantined at close
    assert sorted(os.listdir(root)) == [".quarantine", "clean.txt"]
    assert sorted(os.listdir(root / ".quarantine")) == sorted([f"{found_ino}-eicar.txt", f"{written_ino}-split.txt"])
    assert (root / ".quarantine" / f"{found_ino}-eicar.txt").read_bytes() == EICAR
    assert os.stat(root / ".quarantine").st_mode & 0o777 == 0o700
    assert await vol.read_file("clean.txt") == CLEAN


@pytest.mark.parametrize(
    ("key", "value"),
    [("Policy", "maybe"), ("ScanTimeout", "soon"), ("ScanTimeout", "0"), ("Quarantine", "a/b")],
)
async def test_bad_parameters_fail_the_load_naming_the_parameter(bench: Bench, key: str, value: str) -> None:
    with pytest.raises((StackError, ValueError), match=f"parameter '?{key}"):
        bench.volume({}, **{key: value})


async def test_a_second_service_is_refused_and_takes_over_when_the_first_goes(
    bench: Bench, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="fltfuse.port")
    vol = bench.volume({"clean.txt": CLEAN})
    first = await bench.serve(vol)
    data = data_of(vol)
    second = bench.start(vol)

    def refusals() -> int:
        return sum(f"refused pid {second.pid} " in record.getMessage() for record in caplog.records)

    await until(lambda: refusals() >= 2, "the second service to be refused twice (it tries each second)")
    assert "allows 1 connection" in second.log_text()
    assert await vol.read_file("clean.txt") == CLEAN
    assert first.verdicts() == ["clean open /clean.txt"] and second.process.poll() is None
    first.stop()
    await until(lambda: data.client is not None and data.client.pid == second.pid, "the second service to connect")
    await truncate(vol, "clean.txt", 3)
    assert await vol.read_file("clean.txt") == CLEAN[:3]
    assert second.verdicts() == ["clean open /clean.txt"]
    assert second.log_text().count("cannot connect") == 1  # said once, not each time it tried


async def test_the_port_answers_stats_and_an_error_to_what_it_does_not_understand(bench: Bench) -> None:
    vol = bench.volume({"clean.txt": CLEAN}, Policy="allow")
    await vol.read_file("clean.txt")
    hello = protocol.encode({"service": "test", "fingerprint": "f1"})
    async with open_filter_port(vol.port_path(protocol.PORT_NAME), hello) as port:
        header, _ = protocol.decode(await port.send_message(protocol.encode({"op": "stats"})))
        assert header == {"v": 1, "ok": True, "stats": {"unscanned": 1}, "cached": 0}
        for garbage in (b"", b"\x00\x00\x00\x09not json!", protocol.encode({"op": "launch"})):
            header, _ = protocol.decode(await port.send_message(garbage))
            assert header["ok"] is False and header["error"]
        await port.send_message(protocol.encode({"op": "database", "fingerprint": "f2"}))
        assert data_of(vol).fingerprint == "f2"


def serve_connect_and_scan(path: Path, pipe: int) -> threading.Thread:
    """A daemon stand-in on ``path`` that answers CONNECT with CONNECTED and, in the same segment, a scan
    MESSAGE carrying ``pipe`` (as a filter sending the moment its connect callback accepted the service)."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)

    def run() -> None:
        with listener, listener.accept()[0] as conn:
            frames = encode(Frame(FrameKind.CONNECTED)) + encode(Frame(FrameKind.MESSAGE, 7, 4096, b"scan", (pipe,)))
            conn.sendmsg([frames], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [pipe]).tobytes())])
            while conn.recv(1024):  # the CONNECT, then nothing until the client closes
                pass

    thread = threading.Thread(target=run)
    thread.start()
    return thread


async def test_a_scan_sent_as_the_service_connects_keeps_its_descriptor(tmp_path: Path) -> None:
    read_end, write_end = os.pipe()
    os.write(write_end, CLEAN)
    os.close(write_end)
    try:
        daemon = serve_connect_and_scan(tmp_path / "threads", read_end)
        with connect_communication_port(str(tmp_path / "threads")) as port:
            message = port.get_message(timeout=10)
            assert (message.message_id, message.data, len(message.fds)) == (7, b"scan", 1)
            assert os.read(message.fds[0], 100) == CLEAN
            message.close()
        daemon.join()
        daemon = serve_connect_and_scan(tmp_path / "trio", read_end)
        async with open_filter_port(str(tmp_path / "trio")) as async_port:
            message = await async_port.get_message()
            assert (message.message_id, message.data, len(message.fds)) == (7, b"scan", 1)
            message.close()
        daemon.join()
    finally:
        os.close(read_end)


# -- the ClamAV engine ------------------------------------------------------------------------------------------


async def test_clamav_verdicts_through_the_filter_agree_with_clamscan(bench: Bench, tmp_path: Path) -> None:
    files = clamav_samples(NOISE[:200_000])
    vol = bench.volume(files)
    with running_clamd(tmp_path / "clamd") as clamd:
        args = ["--engine", "clamav", "--clamd-socket", str(clamd.socket), "--clamd-database", str(clamd.database)]
        service = await bench.serve(vol, *args)
        through_filter: dict[str, str | None] = {}
        for name in files:
            try:
                await vol.read_file(name)
                through_filter[name] = None
            except PermissionError:
                (line,) = [v for v in service.verdicts() if v.startswith(f"INFECTED open /{name}: ")]
                through_filter[name] = line.partition(": ")[2]
        expected = clamscan_verdicts([vol.directory / name for name in files], clamd.database)
        assert through_filter == {path.name: verdict for path, verdict in expected.items()}
        assert sum(v is not None for v in through_filter.values()) == 4, through_filter

        # A write carrying a signature fails; then a signature added to clamd's database reaches the filter.
        with pytest.raises(PermissionError):
            await write_through(vol, "new.bin", b"x" + TEST_PATTERN)
        data = data_of(vol)
        old = data.fingerprint
        signature = clamd.add_signature("Fltfuse-Noise", NOISE[5000:5040])
        await until(lambda: data.fingerprint != old, "the filter to hear of clamd's new database", timeout=60)
        with pytest.raises(PermissionError):
            await vol.read_file("noise.bin")
        assert service.verdicts()[-1] == f"INFECTED open /noise.bin: {signature}"
        assert clamscan_verdicts([vol.directory / "noise.bin"], clamd.database) == {
            vol.directory / "noise.bin": signature
        }
