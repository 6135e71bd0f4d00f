#!/usr/bin/env python3
"""Round trips per second through a communication port (a benchmark, not a test).

The filter side is a filter on an :class:`~fltfuse.testing.InProcessVolume`
served by trio in this process, exactly as the daemon serves it; the
user-mode side is another process (this script with ``--client``) using
:mod:`fltfuse.port` from 1 or 8 threads sharing one connection, as a
service's worker threads share one port handle. Two directions:

* ``FilterSendMessage``: each client thread sends a message and waits for the
  filter's answer (``message_notify`` answers with the message's bytes);
* ``FltSendMessage``: as many filter tasks as there are client threads send a
  message and wait for the reply; each client thread gets a message and
  replies with its bytes.

A round trip carries the message size both ways. Each cell runs for
``--seconds``; the table gives round trips per second and the payload MiB/s
(both ways). Usage::

    .venv/bin/python scripts/port_bench.py [--seconds 3] [--sizes 64,4096,65536] [--threads 1,8]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import trio

from fltfuse import (
    ClientPort,
    Filter,
    FilterRegistration,
    close_client_port,
    close_communication_port,
    create_communication_port,
    send_message,
)
from fltfuse.port import PortDisconnectedError, connect_communication_port
from fltfuse.testing import InProcessVolume

PORT = "BenchPort"
DIRECTIONS = {"client": "FilterSendMessage", "filter": "FltSendMessage"}


# -- the user-mode side (a process of its own) -------------------------------------------------------


def client(path: str, direction: str, threads: int, size: int, seconds: float) -> None:
    """Connect, run ``threads`` threads for the direction, print {"count", "seconds"} as JSON."""
    port = connect_communication_port(path, b"bench")
    data = b"x" * size
    counts = [0] * threads

    def send(index: int) -> None:  # FilterSendMessage until the time is up
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if port.send_message(data, reply_capacity=size) != data:
                raise AssertionError("a wrong answer")
            counts[index] += 1

    def reply(index: int) -> None:  # FilterGetMessage + FilterReplyMessage until the filter closes the port
        try:
            while True:
                message = port.get_message()
                port.reply_message(message.message_id, message.data)
                counts[index] += 1
        except PortDisconnectedError:
            pass

    workers = [threading.Thread(target=send if direction == "client" else reply, args=(i,)) for i in range(threads)]
    start = time.monotonic()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    elapsed = time.monotonic() - start
    port.close()
    print(json.dumps({"count": sum(counts), "seconds": elapsed}), flush=True)


# -- the filter side (this process, under trio) --------------------------------------------------------


@dataclass
class BenchFilter:
    """A filter with one port that answers each message with its own bytes."""

    clients: list[ClientPort] = field(default_factory=list)
    filter: Filter = field(init=False)

    def __post_init__(self) -> None:
        self.filter = Filter("portbench", FilterRegistration(filter_load=self.load, filter_unload=self.unload))

    def load(self, filter_: Filter) -> None:
        create_communication_port(
            filter_,
            PORT,
            connect_notify=lambda client, cookie, context: self.clients.append(client),
            disconnect_notify=lambda cookie: None,
            message_notify=lambda cookie, data, capacity: data,
            max_connections=1,
        )

    def unload(self, flags: Any) -> None:
        for port in self.filter.ports:
            close_communication_port(port)


async def measure(
    vol: InProcessVolume, bench: BenchFilter, direction: str, threads: int, size: int, seconds: float
) -> tuple[int, float]:
    """One cell: (round trips, seconds)."""
    bench.clients.clear()
    argv = [sys.executable, __file__, "--client", vol.port_path(PORT), direction, str(threads), str(size), str(seconds)]
    process = await trio.lowlevel.open_process(argv, stdout=-1)
    assert process.stdout is not None
    with trio.fail_after(30):
        while not bench.clients:
            await trio.sleep(0.001)
    count = 0
    elapsed = 0.0
    if direction == "filter":
        connection = bench.clients[0]
        data = b"x" * size
        start = trio.current_time()
        deadline = start + seconds

        async def sender() -> None:
            nonlocal count
            while trio.current_time() < deadline:
                if await send_message(connection, data, reply_capacity=size, timeout=30) != data:
                    raise AssertionError("a wrong reply")
                count += 1

        async with trio.open_nursery() as nursery:
            for _ in range(threads):
                nursery.start_soon(sender)
        elapsed = trio.current_time() - start
        close_client_port(connection)
    output = b""
    while chunk := await process.stdout.receive_some():
        output += chunk
    if await process.wait() != 0:
        raise RuntimeError(f"the client process failed: {output!r}")
    if direction == "client":
        result = json.loads(output)
        count, elapsed = result["count"], result["seconds"]
    return count, elapsed


async def bench(seconds: float, sizes: list[int], thread_counts: list[int]) -> list[tuple[str, int, int, float, float]]:
    rows = []
    with tempfile.TemporaryDirectory() as directory:
        bench_filter = BenchFilter()
        async with InProcessVolume(directory, filters=[(bench_filter.filter, "370000")]) as vol:
            for direction in DIRECTIONS:
                for threads in thread_counts:
                    for size in sizes:
                        count, elapsed = await measure(vol, bench_filter, direction, threads, size, seconds)
                        rate = count / elapsed
                        rows.append((direction, threads, size, rate, 2 * rate * size / 2**20))
                        print(
                            f"{DIRECTIONS[direction]:<18} {threads:>7} {size:>8} {rate:>12,.0f} {rows[-1][4]:>9.1f}",
                            flush=True,
                        )
    return rows


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--client":
        path, direction, threads, size, seconds = sys.argv[2:7]
        client(path, direction, int(threads), int(size), float(seconds))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="how long each cell runs (default 3)")
    parser.add_argument("--sizes", default="64,4096,65536", help="message sizes in bytes")
    parser.add_argument("--threads", default="1,8", help="client thread counts")
    args = parser.parse_args()
    cpus = os.cpu_count()
    print(f"# Python {platform.python_version()}, trio {trio.__version__}, {cpus} CPUs, {args.seconds} s per cell")
    print(f"{'direction':<18} {'threads':>7} {'bytes':>8} {'round trips/s':>12} {'MiB/s':>9}")
    trio.run(bench, args.seconds, [int(s) for s in args.sizes.split(",")], [int(t) for t in args.threads.split(",")])


if __name__ == "__main__":
    main()
