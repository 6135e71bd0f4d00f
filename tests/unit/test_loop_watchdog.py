"""The loop watchdog: a callback that blocks the event loop is reported, naming its filter; in-process."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from fltfuse import (
    CallbackData,
    FilterRegistration,
    MajorFunction,
    OperationRegistration,
    PostopCallbackStatus,
    PostopFlags,
    PreopCallbackStatus,
    RelatedObjects,
)
from fltfuse._stack import Filter
from fltfuse._stack.loop_watchdog import BEAT, LoopWatchdog
from fltfuse.testing import InProcessVolume

THRESHOLD = 0.3
BLOCK = 1.0  # how long the blocking callbacks sleep: well past the threshold, and a beat or more after it


def pre_read(cbd: CallbackData, objects: RelatedObjects) -> PreopCallbackStatus:
    time.sleep(BLOCK)  # the bug the watchdog reports: a synchronous wait in the event loop
    return PreopCallbackStatus.SUCCESS_NO_CALLBACK


def pre_write(cbd: CallbackData, objects: RelatedObjects) -> PreopCallbackStatus:
    return PreopCallbackStatus.SUCCESS_WITH_CALLBACK


async def post_write(
    cbd: CallbackData, objects: RelatedObjects, context: object, flags: PostopFlags
) -> PostopCallbackStatus:
    time.sleep(BLOCK)  # blocking inside a coroutine blocks the loop just the same
    return PostopCallbackStatus.FINISHED_PROCESSING


BLOCKER = FilterRegistration(
    operations=(
        OperationRegistration(MajorFunction.READ, pre_read),
        OperationRegistration(MajorFunction.WRITE, pre_write, post_write),
    )
)


@pytest.fixture
async def watched(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> AsyncIterator[InProcessVolume]:
    """A volume with the blocking filter, and a watchdog (threshold 0.3 s) beating in the test's loop."""
    caplog.set_level(logging.INFO, logger="fltfuse.watchdog")
    (tmp_path / "f").write_bytes(b"data")
    async with trio.open_nursery() as nursery:
        await nursery.start(LoopWatchdog(THRESHOLD).serve)
        async with InProcessVolume(tmp_path, [(Filter("blocker", BLOCKER), "370000")]) as vol:
            yield vol
        nursery.cancel_scope.cancel()


async def settle() -> None:
    """Let the loop run long enough for the watchdog to see it beat again."""
    await trio.sleep(3 * BEAT)


def records(caplog: pytest.LogCaptureFixture, level: int) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "fltfuse.watchdog" and r.levelno == level]


async def test_a_pre_operation_that_blocks_is_reported_naming_its_filter(
    watched: InProcessVolume, caplog: pytest.LogCaptureFixture
) -> None:
    handle = await watched.open("f")
    try:
        assert await watched.read(handle, 0, 4) == b"data"  # it returns in the end, and so does the read
    finally:
        await watched.close_handle(handle)
    await settle()
    [error] = records(caplog, logging.ERROR)
    assert error.startswith("filter blocker (instance blocker Instance) has blocked the event loop for 0.")
    assert " s in its callback pre_read for " in error and "READ" in error
    assert "time.sleep(BLOCK)" in error  # the innermost frames show where
    [resumed] = records(caplog, logging.WARNING)
    assert resumed.startswith("the event loop runs again after ")
    assert BLOCK - 2 * BEAT <= float(resumed.split()[-3]) <= BLOCK + 2 * BEAT


async def test_an_async_post_operation_that_blocks_is_reported_as_itself(
    watched: InProcessVolume, caplog: pytest.LogCaptureFixture
) -> None:
    handle = await watched.open("f", 1)  # O_WRONLY
    try:
        await watched.write(handle, 0, b"DATA")
    finally:
        await watched.close_handle(handle)
    await settle()
    [error] = records(caplog, logging.ERROR)
    assert "(instance blocker Instance)" in error and " s in its callback post_write for " in error


async def test_blocking_outside_any_filter_is_a_warning_without_a_filter(
    watched: InProcessVolume, caplog: pytest.LogCaptureFixture
) -> None:
    time.sleep(BLOCK)  # the loop's thread, in no callback
    await settle()
    assert records(caplog, logging.ERROR) == []
    blocked, resumed = records(caplog, logging.WARNING)
    assert blocked.startswith("the event loop has been blocked for ") and "not in a filter's callback" in blocked
    assert "test_blocking_outside_any_filter_is_a_warning_without_a_filter" in blocked
    assert resumed.startswith("the event loop runs again after ")


async def test_a_loop_that_keeps_running_is_never_reported(
    watched: InProcessVolume, caplog: pytest.LogCaptureFixture
) -> None:
    for _ in range(10):  # requests the filter does not block, spread over more than the threshold
        await watched.close_handle(await watched.open("f"))
        await watched.stat("f")
        await trio.sleep(BEAT / 2)
    assert records(caplog, logging.ERROR) == records(caplog, logging.WARNING) == []


async def test_threshold_zero_starts_no_watcher() -> None:
    async with trio.open_nursery() as nursery:
        await nursery.start(LoopWatchdog(0).serve)
        assert not [t for t in threading.enumerate() if t.name == "fltfuse loop watchdog"]
        nursery.cancel_scope.cancel()


async def test_the_watcher_thread_has_ended_when_serve_returns() -> None:
    async with trio.open_nursery() as nursery:
        await nursery.start(LoopWatchdog(THRESHOLD).serve)
        [watcher] = [t for t in threading.enumerate() if t.name == "fltfuse loop watchdog"]
        nursery.cancel_scope.cancel()
    assert not watcher.is_alive()
