#!/usr/bin/env python3
"""What one file name query costs, in-process: a cache hit, a cache miss, and the opened name, by depth.

    .venv/bin/python scripts/name_query_cost.py [--queries N] [--rounds R] [--directory DIR]

Setup: an InProcessVolume over a fresh temporary directory on local disk (``/var/tmp`` unless
``--directory``), with one instance that registers no operations: it only asks for names, with
``get_file_name_information_unsafe`` (what a filter's work item calls; a query in a callback
does the same work). For a file 1, 4 and 8 directories deep (looked up through the volume, as
the kernel would have), it times:

  hit            NORMALIZED, DEFAULT, the name already cached (warm)
  miss fs-only   NORMALIZED, FILESYSTEM_ONLY: asks the backend every time (and refreshes the cache)
  miss default   NORMALIZED, DEFAULT right after purge_name_cache (the purge is not timed)
  opened hit     OPENED, DEFAULT, for a handle opened through the file's link, cached
  opened fs      OPENED, FILESYSTEM_ONLY: checks that the link still names the file, then names it

Each cell is the median over the rounds of the mean cost of one query (µs). A round of the
"miss default" column times each query on its own (a purge comes before each); the others time
N queries back to back. A benchmark: it reports numbers and asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path

import trio

from fltfuse import (
    FileObject,
    Filter,
    FilterRegistration,
    Instance,
    NameFormat,
    NameQuery,
    RelatedObjects,
    get_file_name_information_unsafe,
    purge_name_cache,
)
from fltfuse.testing import InProcessVolume

DEPTHS = (1, 4, 8)
COLUMNS = ("hit", "miss fs-only", "miss default", "opened hit", "opened fs")


def per_query_us(query: Callable[[], object], count: int, before_each: Callable[[], object] | None = None) -> float:
    """The mean cost of one ``query()`` in µs, over ``count`` calls (``before_each`` is run, untimed, before each)."""
    if before_each is None:
        start = time.perf_counter_ns()
        for _ in range(count):
            query()
        return (time.perf_counter_ns() - start) / count / 1000
    total = 0
    for _ in range(count):
        before_each()
        start = time.perf_counter_ns()
        query()
        total += time.perf_counter_ns() - start
    return total / count / 1000


async def measure(directory: Path, queries: int, rounds: int) -> dict[int, dict[str, float]]:
    instance = Instance(Filter("namecost", FilterRegistration()), "namecost instance", Decimal(370000))
    results: dict[int, dict[str, float]] = {}
    async with InProcessVolume(directory, [instance]) as vol:
        objects = RelatedObjects(instance.filter, instance, instance.volume, None)
        for depth in DEPTHS:
            parent_path = "/".join(f"level{i}" for i in range(1, depth + 1))
            path = f"{parent_path}/file.txt"
            (directory / parent_path).mkdir(parents=True)
            (directory / path).write_bytes(b"x")
            file_object = FileObject(await vol.lookup(path))
            opened = FileObject(file_object.inode)
            opened.link = (await vol.lookup(parent_path), b"file.txt")  # what the kernel adapter sets at open

            def ask(fo: FileObject, name_format: NameFormat, query: NameQuery) -> Callable[[], object]:
                return lambda: get_file_name_information_unsafe(objects, fo, name_format, query)

            def purge() -> None:
                purge_name_cache(objects)

            cases: dict[str, tuple[Callable[[], object], Callable[[], object] | None]] = {
                "hit": (ask(file_object, NameFormat.NORMALIZED, NameQuery.DEFAULT), None),
                "miss fs-only": (ask(file_object, NameFormat.NORMALIZED, NameQuery.FILESYSTEM_ONLY), None),
                "miss default": (ask(file_object, NameFormat.NORMALIZED, NameQuery.DEFAULT), purge),
                "opened hit": (ask(opened, NameFormat.OPENED, NameQuery.DEFAULT), None),
                "opened fs": (ask(opened, NameFormat.OPENED, NameQuery.FILESYSTEM_ONLY), None),
            }
            samples: dict[str, list[float]] = {column: [] for column in COLUMNS}
            for _ in range(rounds):
                for column, (query, before_each) in cases.items():
                    query()  # warm: the hit columns start cached
                    samples[column].append(per_query_us(query, queries, before_each))
            results[depth] = {column: statistics.median(values) for column, values in samples.items()}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--queries", type=int, default=5000, help="queries per round and column (default 5000)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds; each cell is their median (default 5)")
    parser.add_argument("--directory", default="/var/tmp", help="where the temporary volume directory goes")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="fltfuse-namecost-", dir=args.directory) as tmp:
        results = trio.run(measure, Path(tmp), args.queries, args.rounds)
    fs = os.statvfs(args.directory)
    print(
        f"name query cost, µs per query: median of {args.rounds} rounds x {args.queries} queries; "
        f"Python {platform.python_version()}, {platform.machine()}, {args.directory} "
        f"(block size {fs.f_bsize})"
    )
    print()
    print("| depth | " + " | ".join(COLUMNS) + " |")
    print("|---:|" + "---:|" * len(COLUMNS))
    for depth, row in results.items():
        print(f"| {depth} | " + " | ".join(f"{row[column]:.2f}" for column in COLUMNS) + " |")


if __name__ == "__main__":
    main()
