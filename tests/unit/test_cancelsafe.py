"""The cancelsafe sample in-process: reads under its path wait in a cancel-safe queue, and never get stuck there."""

from __future__ import annotations

import errno
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from decimal import Decimal
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import trio

from fltfuse import (
    Filter,
    FilterUnloadFlags,
    Instance,
    InstanceTeardownFlags,
    MajorFunction,
    NtStatus,
    OperationFlags,
    _loader,
)
from fltfuse._stack import StackError, pending
from fltfuse.testing import InProcessVolume
from fltfuse.testing.in_process import _Caller

DELAY = 0.3  # seconds: OperatingDelay of most tests here


def cancelsafe_instance(**overrides: str) -> Instance:
    """The INF's default instance, with ``--param`` style overrides of its parameters."""
    loaded = _loader.load_filter(_loader.find_inf("cancelsafe"), overrides)
    instance = _loader.default_instance(loaded.filter, loaded.inf)
    assert instance is not None
    return instance


def module_of(instance: Instance) -> ModuleType:
    """The filter's module, as the loader imported it."""
    setup = instance.filter.registration.instance_setup
    assert setup is not None
    return sys.modules[setup.__module__]


def state_of(instance: Instance) -> Any:
    state = module_of(instance).state_of(instance)
    assert state is not None, f"{instance!r} has no state: not attached?"
    return state


@pytest.fixture
def make_volume(tmp_path: Path) -> Iterator[Callable[..., tuple[InProcessVolume, Instance]]]:
    """Volumes over tmp_path/vol-N, with files put there first, and a cancelsafe instance configured by ``params``."""
    made: list[InProcessVolume] = []

    def make(files: Mapping[str, bytes] = {}, **params: str) -> tuple[InProcessVolume, Instance]:
        directory = tmp_path / f"vol-{len(made)}"
        directory.mkdir()
        for name, data in files.items():
            (directory / name).parent.mkdir(parents=True, exist_ok=True)
            (directory / name).write_bytes(data)
        params.setdefault("OperatingDelay", str(round(DELAY * 1000)))
        instance = cancelsafe_instance(**params)
        volume = InProcessVolume(directory, [instance])
        made.append(volume)
        return volume, instance

    yield make
    for volume in made:
        if volume.stack.instances:  # not closed by the test
            volume.close()


async def timed_read(vol: InProcessVolume, path: str, length: int = 4096) -> tuple[bytes, float]:
    """One open, one READ, one close; returns the data and how long the READ took (never hangs the test)."""
    with trio.fail_after(10):
        handle = await vol.open(path)
        try:
            start = time.monotonic()
            data = await vol.read(handle, 0, length)
            return data, time.monotonic() - start
        finally:
            await vol.close_handle(handle)


async def read_file(vol: InProcessVolume, path: str) -> bytes:
    """The whole file, READ after READ (never hangs the test)."""
    with trio.fail_after(10):
        return await vol.read_file(path)


async def read_into(outcome: list[Any], vol: InProcessVolume, handle: int, length: int = 100) -> None:
    """One read of ``handle``: append the bytes, or the errno it failed with."""
    try:
        outcome.append(await vol.read(handle, 0, length))
    except OSError as exc:
        outcome.append(exc.errno)


async def wait_until(condition: Callable[[], Any], timeout: float = 5.0) -> None:
    with trio.fail_after(timeout):
        while not condition():
            await trio.sleep(0.005)


# -- configuration and registration --------------------------------------------------------------


def test_the_inf_sets_path_delay_and_altitude() -> None:
    instance = cancelsafe_instance()
    assert dict(instance.filter.parameters) == {"OperatingPath": "slow", "OperatingDelay": 2000}
    assert instance.name == "CancelSafe Instance"
    assert 360000 <= instance.altitude <= 389999 and instance.altitude != 370030
    read = instance.filter.operations[MajorFunction.READ]
    assert read.flags & OperationFlags.BYPASS_KERNEL_CACHE  # every read(2) a request, waited for interruptibly
    assert read.flags & OperationFlags.SKIP_PAGING_IO  # page-cache reads of files opened before it attached
    assert module_of(instance).configuration(instance.filter.parameters) == ((b"slow",), 2.0)


@pytest.mark.parametrize(
    ("parameters", "problem"),
    [
        ({"OperatingPath": "../outside"}, "may not contain '..'"),
        ({"OperatingDelay": "soon"}, "not a number"),
        ({"OperatingDelay": -5}, "negative"),
    ],
)
def test_bad_parameters_make_the_instance_decline(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, parameters: dict[str, Any], problem: str
) -> None:
    registration = cancelsafe_instance().filter.registration
    instance = Instance(Filter("cancelsafe", registration, parameters), "CancelSafe Instance", Decimal(370160))
    with caplog.at_level(logging.WARNING), pytest.raises(StackError) as info:
        InProcessVolume(tmp_path, [instance])
    assert info.value.status == NtStatus.FLT_DO_NOT_ATTACH
    assert problem in caplog.text


async def test_default_configuration_from_the_fixture(fltfuse_in_process: Callable[..., InProcessVolume]) -> None:
    """The fixture's volume starts empty: the directory is tracked once it is made; the 2 s delay holds reads."""
    vol = fltfuse_in_process(filters=["cancelsafe"])
    (instance,) = vol.stack.instances
    state = state_of(instance)
    assert (state.components, state.delay, state.anchor) == ((b"slow",), 2.0, (1, (b"slow",)))
    await vol.mkdir("slow")
    await vol.write_file("slow/f", b"data")
    handle = await vol.open("slow/f")
    outcome: list[Any] = []

    with trio.fail_after(1.0):  # well before the 2 s delay
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_into, outcome, vol, handle)
            await wait_until(lambda: len(state.queue) == 1)
            assert pending.cancel(state.schedule[0][1])  # what the filter manager does for an interrupted caller
    assert outcome == [errno.EINTR]
    await vol.close_handle(handle)


# -- which reads wait, and for how long -----------------------------------------------------------


async def test_a_read_under_the_path_waits_the_delay_and_returns_the_data(make_volume: Callable[..., Any]) -> None:
    vol, instance = make_volume({"slow/old.txt": b"there before the mount", "slow/deep/er.txt": b"deeper"})
    assert await read_file(vol, "slow/old.txt") == b"there before the mount"  # two READs, both held
    for path, expected in [("slow/old.txt", b"there before the mount"), ("slow/deep/er.txt", b"deeper")]:
        data, took = await timed_read(vol, path)
        assert data == expected
        assert DELAY - 0.01 <= took < DELAY + 0.5, f"{path}: {took:.3f}s"
    assert state_of(instance).completed == 4


async def test_reads_elsewhere_do_not_wait(make_volume: Callable[..., Any]) -> None:
    vol, instance = make_volume(
        {"fast.txt": b"quick", "slower/x": b"not under slow/", "slow/y": b"y"}, OperatingDelay="2000"
    )
    start = time.monotonic()
    assert await read_file(vol, "fast.txt") == b"quick"
    assert await read_file(vol, "slower/x") == b"not under slow/"
    await vol.write_file("new.txt", b"new")
    assert await read_file(vol, "new.txt") == b"new"
    assert time.monotonic() - start < 0.5
    assert state_of(instance).completed == 0


async def test_objects_made_after_attaching_are_tracked(make_volume: Callable[..., Any]) -> None:
    """post-CREATE: files and directories made in the path; post-LOOKUP: files put there behind the filter's back."""
    vol, instance = make_volume({"slow/.keep": b""})
    await vol.mkdir("slow/sub")
    await vol.write_file("slow/sub/made.txt", b"made through the volume")
    (vol.directory / "slow" / "sneaked.txt").write_bytes(b"put there directly")
    (vol.directory / "elsewhere.txt").write_bytes(b"not under the path")
    for path, expected, waits in [
        ("slow/sub/made.txt", b"made through the volume", True),
        ("slow/sneaked.txt", b"put there directly", True),
        ("elsewhere.txt", b"not under the path", False),
    ]:
        data, took = await timed_read(vol, path)
        assert data == expected
        assert (took >= DELAY - 0.01) is waits, f"{path}: {took:.3f}s"
    state = state_of(instance)
    assert state.completed == 2


async def test_a_path_that_does_not_exist_yet_is_tracked_once_made(make_volume: Callable[..., Any]) -> None:
    vol, instance = make_volume({"a/.keep": b""}, OperatingPath="/a/b/c/")
    state = state_of(instance)
    assert state.anchor is not None and state.anchor[1] == (b"b", b"c")
    await vol.mkdir("a/b")
    await vol.write_file("a/b/not-yet.txt", b"above the path")
    await vol.mkdir("a/b/c")
    await vol.write_file("a/b/c/now.txt", b"in the path")
    assert state.anchor is None
    assert (await timed_read(vol, "a/b/not-yet.txt"))[1] < DELAY / 2
    data, took = await timed_read(vol, "a/b/c/now.txt")
    assert data == b"in the path" and took >= DELAY - 0.01


async def test_the_volume_root_as_path_holds_every_read(make_volume: Callable[..., Any]) -> None:
    vol, _ = make_volume({"top.txt": b"top"}, OperatingPath="/")
    data, took = await timed_read(vol, "top.txt")
    assert data == b"top" and took >= DELAY - 0.01


async def test_each_read_waits_the_delay_from_when_it_was_queued_not_after_the_others(
    make_volume: Callable[..., Any],
) -> None:
    vol, _ = make_volume({f"slow/{i}": str(i).encode() for i in range(4)})
    results: dict[int, tuple[bytes, float]] = {}

    async def one(i: int) -> None:
        results[i] = await timed_read(vol, f"slow/{i}")

    start = time.monotonic()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            for i in range(4):
                nursery.start_soon(one, i)
    assert time.monotonic() - start < 2 * DELAY  # the worker does not serialize the waits
    for i in range(4):
        data, took = results[i]
        assert data == str(i).encode() and took >= DELAY - 0.01


# -- cancellation -----------------------------------------------------------------------------------


async def test_cancelling_a_queued_read_gives_eintr_at_once(make_volume: Callable[..., Any]) -> None:
    vol, instance = make_volume({"slow/f": b"content"}, OperatingDelay="1000")
    state = state_of(instance)
    handle = await vol.open("slow/f")
    outcome: list[Any] = []

    async def reader() -> None:
        start = time.monotonic()
        try:
            outcome.append(await vol.read(handle, 0, 100))
        except OSError as exc:
            outcome.append(exc.errno)
        outcome.append(time.monotonic() - start)

    with trio.fail_after(2.0):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            await wait_until(lambda: len(state.queue) == 1)
            ((_, cbd),) = state.schedule
            assert pending.cancel(cbd)
            assert not pending.cancel(cbd)  # once
    assert outcome[0] == errno.EINTR
    assert outcome[1] < 0.5
    assert len(state.queue) == 0
    assert await vol.read(handle, 0, 100) == b"content"  # the next read is held and served
    await vol.close_handle(handle)
    assert state.completed == 1  # the cancelled read's schedule entry was skipped, not completed twice


async def test_an_interrupted_caller_gets_eintr_through_the_filter_managers_watch(
    make_volume: Callable[..., Any],
) -> None:
    """The READ's requestor is the opener: here a stopped child with a signal pending, as a Ctrl-C'd cat would be."""
    vol, instance = make_volume({"slow/f": b"content"}, OperatingDelay="5000")
    state = state_of(instance)
    child = subprocess.Popen(["sleep", "30"])
    try:
        vol._caller = _Caller(child.pid, os.geteuid(), os.getegid(), 0o022)  # the child opens the file
        handle = await vol.open("slow/f")
        outcome: list[Any] = []

        with trio.fail_after(3.0):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(read_into, outcome, vol, handle)
                await wait_until(lambda: len(state.queue) == 1)
                await trio.sleep(0.1)
                assert len(state.queue) == 1  # the caller is fine: the read waits
                os.kill(child.pid, signal.SIGSTOP)
                os.kill(child.pid, signal.SIGUSR1)  # stays pending while the child is stopped
                start = time.monotonic()
                await wait_until(lambda: outcome, timeout=2.0)
        assert outcome == [errno.EINTR]
        assert time.monotonic() - start < 0.5
        assert len(state.queue) == 0
        await vol.close_handle(handle)
    finally:
        child.kill()
        child.wait()


# -- teardown and unload: what is queued is let go, nothing hangs -------------------------------------


async def test_detaching_the_instance_lets_queued_reads_go_at_once(make_volume: Callable[..., Any]) -> None:
    vol, instance = make_volume({"slow/a": b"A", "slow/b": b"B"}, OperatingDelay="10000")
    state = state_of(instance)
    results: dict[str, bytes] = {}

    async def reader(name: str) -> None:
        results[name], _ = await timed_read(vol, f"slow/{name}")

    with trio.fail_after(2.0):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader, "a")
            nursery.start_soon(reader, "b")
            await wait_until(lambda: len(state.queue) == 2)
            await vol.stack.detach(instance, InstanceTeardownFlags.MANUAL)
    assert results == {"a": b"A", "b": b"B"}
    assert module_of(instance).state_of(instance) is None
    await wait_until(lambda: not state.worker.is_alive(), timeout=2.0)
    assert state.completed == 0  # the teardown let them go, not the worker
    _, took = await timed_read(vol, "slow/a")
    assert took < 0.1  # detached: nothing waits any more


async def test_unloading_the_filter_lets_queued_reads_go_at_once(make_volume: Callable[..., Any]) -> None:
    vol, instance = make_volume({"slow/a": b"A"}, OperatingDelay="10000")
    state = state_of(instance)
    results: list[bytes] = []

    async def reader() -> None:
        results.append((await timed_read(vol, "slow/a"))[0])

    with trio.fail_after(2.0):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            await wait_until(lambda: len(state.queue) == 1)
            assert instance.filter.unload(FilterUnloadFlags.NONE) == NtStatus.SUCCESS
    assert results == [b"A"]
    await wait_until(lambda: not state.worker.is_alive(), timeout=2.0)
    _, took = await timed_read(vol, "slow/a")  # still attached, but its queue is disabled
    assert took < 0.1


async def test_closing_the_volume_with_a_queued_read_does_not_hang(
    make_volume: Callable[..., Any], caplog: pytest.LogCaptureFixture
) -> None:
    """Dismount tears the instance down while the read is queued: teardown start lets it go, at once.

    (InProcessVolume.close() releases the backend right after the teardown, so
    the read, let go down, finds its handle closed: EBADF. On a mount the kernel
    does not unmount while a read is in flight.)
    """
    vol, instance = make_volume({"slow/a": b"A"}, OperatingDelay="10000")
    state = state_of(instance)
    handle = await vol.open("slow/a")
    outcome: list[Any] = []

    with caplog.at_level(logging.INFO, logger="fltfuse.filters.cancelsafe"), trio.fail_after(2.0):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_into, outcome, vol, handle, 10)
            await wait_until(lambda: len(state.queue) == 1)
            vol.close()
    assert outcome in ([b"A"], [errno.EBADF])
    assert "1 queued reads let go" in caplog.text
    assert len(state.queue) == 0
    await wait_until(lambda: not state.worker.is_alive(), timeout=2.0)
