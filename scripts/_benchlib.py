"""What the mount benchmarks (scripts/*_bench.py) share: cold caches and timed sequential I/O in 1 MiB requests.

Importing it puts the repository first on ``sys.path``, so a script run as
``scripts/NAME.py`` (its folder on the path) imports ``fltfuse`` and ``filters``
from this checkout. Rates are MB/s: 10^6 bytes a second.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

CHUNK = 1 << 20


class BenchFailure(SystemExit):
    """A workload saw wrong data or a wrong size: its figure would be worthless.

    Uncaught, it ends the script with its message and status 1; a benchmark
    that goes on with its other workloads catches it.
    """


def drop_caches() -> None:
    """Write back, then drop the page, dentry and inode caches (root), so the next read comes from the device."""
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def write_sequential(path: Path, size: int, chunks: Iterable[bytes | bytearray]) -> float:
    """Write ``size`` bytes (whole CHUNKs) to a new ``path``, a chunk a write, then fsync; MB/s, open to close."""
    source = iter(chunks)
    start = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for _ in range(size // CHUNK):
            os.write(fd, next(source))
        os.fsync(fd)
    finally:
        os.close(fd)
    return size / (time.perf_counter() - start) / 1e6


def read_sequential(path: Path, size: int) -> float:
    """Drop the caches, then read ``path`` (``size`` bytes, else BenchFailure) in CHUNK reads; MB/s, open to close."""
    drop_caches()
    start = time.perf_counter()
    fd = os.open(path, os.O_RDONLY)
    total = 0
    try:
        while chunk := os.read(fd, CHUNK):
            total += len(chunk)
    finally:
        os.close(fd)
    if total != size:
        raise BenchFailure(f"read {total} bytes, not {size}")
    return size / (time.perf_counter() - start) / 1e6
