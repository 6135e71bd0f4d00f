"""The scanner on a real mount, with its service ``fltfuse-scanner --volume MNT`` (or with no arguments at all):
what ordinary processes see when they copy, cat and write files, with the pattern engine and with a real clamd.

One mount for the module (Policy=deny, ScanTimeout=10 s); each test starts its own service and stops it
afterwards (one service at a time: the port takes one connection). Files are put straight onto the backing
volume when they must reach the mount unscanned.
"""

from __future__ import annotations

import errno
import json
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

from filters.scanner.engines import eicar
from fltfuse.testing import MountedVolume, mounted_volume, why_no_mount
from tests.clamd import clamscan_verdicts, running_clamd
from tests.scanner_service import CLEAN, Service, clamav_samples, slow_rules

pytestmark = pytest.mark.skipif(why_no_mount() is not None, reason=str(why_no_mount()))

TIMEOUT = 10.0  # seconds: the mount's ScanTimeout
EICAR = eicar()
NOISE = random.Random(7).randbytes(64 << 20)  # incompressible, free of every pattern used here

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
def clean_log(vol: MountedVolume) -> Iterator[None]:
    """The daemon logs no error or traceback during the test."""
    start = len(vol.log_text())
    yield
    bad = [line for line in vol.log_text()[start:].splitlines() if re.search(r" (ERROR|CRITICAL) |Traceback", line)]
    assert not bad, "the daemon logged errors:\n" + "\n".join(bad)


def connected(vol: MountedVolume, service: Service) -> bool:
    return f"scanner: service fltfuse-scanner (pid {service.pid}) connected" in vol.log_text()


def disconnected(vol: MountedVolume, service: Service) -> bool:
    return f"scanner: service pid {service.pid} disconnected" in vol.log_text()


@pytest.fixture
def serve(vol: MountedVolume, tmp_path: Path, wait_for: Callable[..., Any]) -> Iterator[Callable[..., Service]]:
    """``serve(*args)`` starts ``fltfuse-scanner --volume MNT -v --log LOG *args`` and waits until the filter
    has it connected (``command=[...]``: that command line instead, with its stderr as the log). Every service
    is stopped after the test, and its disconnection seen by the filter, so that the next one can connect."""
    started: list[Service] = []

    def start(*args: str, command: list[str] | None = None) -> Service:
        log = tmp_path / f"service-{len(started)}.log"
        if command is None:
            service = Service.start(["--volume", vol.mountpoint, *args], log)
        else:
            service = Service.start(args, log.with_suffix(".out"), command=command)
        started.append(service)
        wait_for(lambda: connected(vol, service) or service.process.poll() is not None, "the service to connect")
        assert connected(vol, service), service.log_text()
        return service

    yield start
    for service in started:
        service.stop()
        if connected(vol, service):
            wait_for(lambda s=service: disconnected(vol, s), "the filter to see the service go")


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


def start_opener(path: Path) -> subprocess.Popen[str]:
    """A process opening ``path`` (OPENER); returns once it is about to call open(2)."""
    opener = subprocess.Popen([sys.executable, "-c", OPENER, str(path)], stdout=subprocess.PIPE, text=True)
    assert opener.stdout is not None and opener.stdout.readline() == "opening\n"
    return opener


def opened(opener: subprocess.Popen[str]) -> dict[str, Any]:
    out, _ = opener.communicate(timeout=60)
    result: dict[str, Any] = json.loads(out)
    return result


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
    assert denied(cat(mnt(vol, "eicar.com")))
    with pytest.raises(PermissionError):  # again, from the verdict cache
        mnt(vol, "eicar.com").read_bytes()
    assert service.verdicts() == ["INFECTED open /eicar.com: EICAR-Test-File"]
    assert "scanner: open of /eicar.com denied: EICAR-Test-File found by pattern" in vol.log_text()


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


def test_mmap_writes_are_scanned_when_the_kernel_writes_them_back(
    vol: MountedVolume, serve: Callable[..., Service]
) -> None:
    service = serve()
    put(vol, "mapped.txt", b"." * 8192)
    fd = os.open(mnt(vol, "mapped.txt"), os.O_RDWR)
    try:
        with mmap.mmap(fd, 8192) as mapped:
            mapped[5000 : 5000 + len(EICAR)] = EICAR
            with pytest.raises(OSError) as excinfo:
                mapped.flush()  # msync(2): the page goes down as a WRITE, which the scanner refuses
            assert excinfo.value.errno == errno.EACCES
    finally:
        os.close(fd)
    assert (Path(vol.backing) / "mapped.txt").read_bytes() == b"." * 8192
    assert service.verdicts() == [
        "clean open /mapped.txt",
        "INFECTED write /mapped.txt: EICAR-Test-File",
        "clean close /mapped.txt",  # the handle wrote (tried to): rescanned, what the disk has is clean
    ]


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
    big = opened(opener)
    assert "big.bin" in listing.stdout and small.stdout == CLEAN
    assert big["errno"] == 0
    assert big["start"] < start and done < big["end"], (big, start, done)
    assert service.verdicts() == ["clean open /large/small.txt", "clean open /large/big.bin"]


def test_a_service_killed_mid_scan_gets_the_policy_at_once(
    vol: MountedVolume, serve: Callable[..., Service], tmp_path: Path, wait_for: Callable[..., Any]
) -> None:
    service = serve("--rules", str(slow_rules(tmp_path / "slow.rules")))
    put(vol, "killed/big.bin", NOISE)
    put(vol, "killed/clean.txt", CLEAN)

    def bytes_read() -> int:
        (line,) = [
            line for line in Path(f"/proc/{service.pid}/io").read_text().splitlines() if line.startswith("rchar:")
        ]
        return int(line.split()[1])

    before = bytes_read()
    opener = start_opener(mnt(vol, "killed/big.bin"))
    wait_for(lambda: bytes_read() > before + (8 << 20), "the service to be reading the file")
    service.signal(signal.SIGKILL)
    killed = time.monotonic()
    big = opened(opener)
    assert big["errno"] == errno.EACCES  # Policy=deny
    assert big["end"] - killed < TIMEOUT / 4, "the policy waited for the timeout"
    assert re.search(r"scanner: no verdict for /killed/big\.bin: .*disconnected", vol.log_text())
    # Nothing hangs: the mount answers, and with no service the policy decides at once.
    assert "clean.txt" in os.listdir(mnt(vol, "killed"))
    wait_for(lambda: disconnected(vol, service), "the filter to see the service gone")
    before_open = time.monotonic()
    assert denied(cat(mnt(vol, "killed/clean.txt")))
    assert time.monotonic() - before_open < TIMEOUT / 4
    serve()
    assert cat(mnt(vol, "killed/clean.txt")).stdout == CLEAN


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
        assert sum(v is not None for v in through_mount.values()) == 4, through_mount
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
