#!/usr/bin/env python3
"""What the anti-virus scanner costs on a mount: opens of clean files, large-file reads, writes.

    sudo .venv/bin/python scripts/scanner_bench.py [--files N] [--large 512M] [--rounds 3] [--threads 4]

Setup: one fresh ext4 image on a loop device, mounted by a real fltfuse daemon
with the empty stack. Each workload runs on the raw ext4 (the volume's
backing directory), then through the mount with the empty stack; then
``fltmc load scanner`` attaches the scanner (Extensions "*": every file is
scanned), ``fltfuse-scanner --volume MNT`` (pattern engine, default rules)
connects, and the workloads run again. Each round uses files of its own,
written on the raw ext4 (never scanned), so the scanner's first open of each is
cold (a scan) and the next ones are warm (the verdict cache answers).

  open       N files of 4 KiB: open, read, close each, one after the other,    opens/s
             twice: "first" (the scanner scans each) and "again" (its verdict
             cache answers); caches dropped before the first pass
  large      one file of --large bytes, caches dropped first: open, read it    MB/s
             all in 1 MiB reads, close; "first" (the scanner's open scans the
             whole file before it returns) and "again" (the cached verdict)
  write      a new file of --large bytes written in 1 MiB writes, then fsync   MB/s
             (scanner: every write's data is scanned before it is written)

Cells are medians over the rounds; "vs empty" is the scanner's against the
empty stack's (1.0 = as fast), "vs raw" against the raw ext4's. A benchmark:
it reports, it asserts nothing.
Everything it mounts is unmounted and detached on exit.
"""

from __future__ import annotations

import argparse
import itertools
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from _benchlib import CHUNK, REPO, drop_caches, read_sequential, write_sequential

from fltfuse._volume import parse_size
from fltfuse.testing import mounted_volume


def make_files(directory: Path, files: int, large: int) -> None:
    """The round's files, written on the raw ext4 (so no scan has seen them)."""
    (directory / "small").mkdir(parents=True)
    for i in range(files):
        (directory / "small" / f"f{i:05d}.txt").write_bytes(os.urandom(4096))
    with open(directory / "large.bin", "wb") as f:
        for _ in range(large // CHUNK):
            f.write(os.urandom(CHUNK))
    os.sync()


def opens(directory: Path, files: int) -> float:
    start = time.perf_counter()
    for i in range(files):
        fd = os.open(directory / "small" / f"f{i:05d}.txt", os.O_RDONLY)
        try:
            if len(os.read(fd, 8192)) != 4096:
                raise SystemExit("a short read")
        finally:
            os.close(fd)
    return files / (time.perf_counter() - start)


def read_large(directory: Path, size: int) -> float:
    return read_sequential(directory / "large.bin", size)


def write_large(directory: Path, size: int) -> float:
    path = directory / "written.bin"
    rate = write_sequential(path, size, itertools.repeat(os.urandom(CHUNK)))
    path.unlink()
    return rate


def start_service(mountpoint: str, threads: int, log_path: Path) -> subprocess.Popen[bytes]:
    log = open(log_path, "wb")  # the service writes to it until it stops
    service = subprocess.Popen(
        [sys.executable, "-m", "filters.scanner.user", "--volume", mountpoint, "--threads", str(threads)],
        cwd=REPO,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 30
    while b"serving" not in log_path.read_bytes():
        if service.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"fltfuse-scanner did not connect:\n{log_path.read_text(errors='replace')}")
        time.sleep(0.05)
    return service


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=2000)
    parser.add_argument("--large", type=parse_size, default=parse_size("512M"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=4, help="the service's worker threads")
    parser.add_argument("--tmpdir", default="/var/tmp")
    args = parser.parse_args()
    results: dict[str, list[float]] = {}

    def measure(key: str, fn: Callable[[Path, int], float], directory: Path, count: int) -> None:
        results.setdefault(key, []).append(fn(directory, count))

    with tempfile.TemporaryDirectory(prefix="fltfuse-scanbench-", dir=args.tmpdir) as tmp:
        size = f"{(3 * args.large + args.files * 8192) // (1 << 20) + 1024}M"  # one round's files at a time
        with mounted_volume(tmp, size=size) as vol:
            raw, mnt = Path(vol.backing), Path(vol.mountpoint)
            service = None
            try:
                for stack in ("empty", "scanner"):
                    if stack == "scanner":
                        subprocess.run(
                            [sys.executable, "-m", "fltfuse.fltmc", "load", "scanner", str(mnt)],
                            check=True,
                            capture_output=True,
                        )
                        service = start_service(str(mnt), args.threads, Path(tmp) / "service.log")
                    for rnd in range(args.rounds):
                        name = f"{stack}-{rnd}"
                        make_files(raw / name, args.files, args.large)
                        targets = [("raw", raw)] if stack == "empty" else []
                        for label, root in [*targets, (stack, mnt)]:
                            drop_caches()
                            for attempt in ("first", "again"):  # the scanner: a scan, then the cached verdict
                                measure(f"open {attempt} {label}", opens, root / name, args.files)
                            for attempt in ("first", "again"):
                                measure(f"large {attempt} {label}", read_large, root / name, args.large)
                            measure(f"write - {label}", write_large, root / name, args.large)
                        shutil.rmtree(raw / name)  # on the raw ext4: no scan, no filter sees it
                        print(f"round {rnd + 1}/{args.rounds} on the {stack} stack done", file=sys.stderr)
            finally:
                if service is not None:
                    service.send_signal(signal.SIGTERM)
                    service.wait(30)
    median = {key: statistics.median(values) for key, values in results.items()}
    print(f"# scanner cost, {platform.node()}, {os.cpu_count()} CPUs, {args.rounds} round(s)")
    print(f"# {args.files} files of 4 KiB; large file {args.large >> 20} MiB; service with {args.threads} threads")
    print("# first: the file's first open on the stack (scanner: a scan); again: the next (scanner: cached verdict)\n")
    print(f"{'workload':<14} {'raw':>9} {'empty':>9} {'scanner':>9} {'vs empty':>9} {'vs raw':>7}  unit")
    for row in dict.fromkeys(key.rsplit(" ", 1)[0] for key in median):
        raw_value, empty, scanner = (
            median.get(f"{row} {stack}", float("nan")) for stack in ("raw", "empty", "scanner")
        )
        unit = "opens/s" if row.startswith("open") else "MB/s"
        print(
            f"{row:<14} {raw_value:>9.0f} {empty:>9.0f} {scanner:>9.0f} {scanner / empty:>9.2f} "
            f"{scanner / raw_value:>7.2f}  {unit}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
