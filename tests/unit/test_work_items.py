"""Deferred work off the request path: when-safe post processing and work items, in-process."""

from __future__ import annotations

import logging
import threading
from decimal import Decimal
from typing import Any

import pytest
import trio

from fltfuse import (
    CallbackData,
    LookupParameters,
    MajorFunction,
    NtStatus,
    complete_pended_preoperation,
    do_completion_processing_when_safe,
    queue_deferred_io_work_item,
    queue_generic_work_item,
)
from fltfuse._backend import ROOT_INODE
from fltfuse._port.deadlocks import requesting_thread
from fltfuse._registration import (
    FilterRegistration,
    OperationRegistration,
    PostopCallbackStatus,
    PostopFlags,
    PreopCallbackStatus,
)
from fltfuse._stack import Filter, Instance, InstanceStack

from .conftest import Driver

TRIO_THREAD = threading.main_thread()


def one_filter(driver: Driver, pre: Any = None, post: Any = None) -> None:
    op = OperationRegistration(MajorFunction.LOOKUP, pre, post)
    driver.stack = InstanceStack(driver.backend, verifier=True)
    driver.stack.attach(Instance(Filter("worker", FilterRegistration(operations=(op,))), "w", Decimal("300000")))
    (driver.root / "x").write_text("")


async def test_when_safe_post_runs_in_a_worker_thread_and_the_request_completes_after_it(driver: Driver) -> None:
    events: list[tuple[str, Any]] = []

    def pre(cbd: CallbackData, objects: Any) -> tuple[PreopCallbackStatus, str]:
        return PreopCallbackStatus.SUCCESS_WITH_CALLBACK, "ctx"

    def safe(cbd: CallbackData, objects: Any, context: Any, flags: PostopFlags) -> PostopCallbackStatus:
        events.append(
            ("safe", (context, threading.current_thread() is TRIO_THREAD, cbd.iopb.parameters.attributes.ino))
        )
        return PostopCallbackStatus.FINISHED_PROCESSING

    def post(cbd: CallbackData, objects: Any, context: Any, flags: PostopFlags) -> PostopCallbackStatus:
        status = do_completion_processing_when_safe(cbd, objects, context, flags, safe)
        events.append(("post returned", status))
        return status

    one_filter(driver, pre, post)
    cbd = await driver.send(LookupParameters(ROOT_INODE, b"x"))
    ino = (driver.root / "x").stat().st_ino
    assert events == [
        ("post returned", PostopCallbackStatus.MORE_PROCESSING_REQUIRED),
        ("safe", ("ctx", False, ino)),
    ]
    assert cbd.io_status.status is NtStatus.SUCCESS


async def test_when_safe_is_refused_while_draining(driver: Driver) -> None:
    called: list[Any] = []
    status = do_completion_processing_when_safe(
        CallbackData.__new__(CallbackData), None, None, PostopFlags.DRAINING, lambda *a: called.append(a)
    )
    assert status is PostopCallbackStatus.FINISHED_PROCESSING and called == []


@pytest.mark.parametrize("kind", ["thread", "task"])
async def test_a_deferred_io_work_item_completes_the_pended_request(driver: Driver, kind: str) -> None:
    seen: list[bool] = []

    def in_thread(cbd: CallbackData, objects: Any, context: Any) -> None:
        seen.append(threading.current_thread() is TRIO_THREAD)
        cbd.io_status.status = NtStatus.ACCESS_DENIED
        complete_pended_preoperation(cbd, PreopCallbackStatus.COMPLETE)

    async def in_task(cbd: CallbackData, objects: Any, context: Any) -> None:
        await trio.sleep(0.01)
        seen.append(threading.current_thread() is TRIO_THREAD)
        cbd.io_status.status = NtStatus.ACCESS_DENIED
        complete_pended_preoperation(cbd, PreopCallbackStatus.COMPLETE)

    def pre(cbd: CallbackData, objects: Any) -> PreopCallbackStatus:
        queue_deferred_io_work_item(cbd, objects, in_thread if kind == "thread" else in_task)
        return PreopCallbackStatus.PENDING

    one_filter(driver, pre)
    with trio.fail_after(5):
        cbd = await driver.send(LookupParameters(ROOT_INODE, b"x"))
    assert cbd.io_status.status is NtStatus.ACCESS_DENIED
    assert seen == [kind == "task"]


async def test_a_work_item_that_raises_fails_its_request_and_names_itself(
    driver: Driver, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(cbd: CallbackData, objects: Any, context: Any) -> None:
        raise RuntimeError("worker bug")

    def pre(cbd: CallbackData, objects: Any) -> PreopCallbackStatus:
        queue_deferred_io_work_item(cbd, objects, broken)
        return PreopCallbackStatus.PENDING

    one_filter(driver, pre)
    with caplog.at_level(logging.ERROR, logger="fltfuse.stack"), trio.fail_after(5):
        cbd = await driver.send(LookupParameters(ROOT_INODE, b"x"))
    assert cbd.io_status.status is NtStatus.FLT_INTERNAL_ERROR
    assert (
        "work item tests.unit.test_work_items" in caplog.text
        and "broken raised RuntimeError('worker bug')" in caplog.text
    )


async def test_a_generic_work_item_runs_off_the_request_path() -> None:
    ran = trio.Event()
    where: list[bool] = []

    def routine(objects: Any, context: Any) -> None:
        where.append(threading.current_thread() is TRIO_THREAD)
        trio.from_thread.run_sync(ran.set)

    queue_generic_work_item(None, routine)
    with trio.fail_after(5):
        await ran.wait()
    assert where == [False]


async def test_a_deferred_work_item_works_for_its_requests_caller_and_a_generic_one_for_nobody(
    driver: Driver,
) -> None:
    # the port's deadlock detector knows whose caller waits on a send by the request the task works for
    seen: dict[str, int] = {}
    generic_ran = trio.Event()

    async def deferred(cbd: CallbackData, objects: Any, context: Any) -> None:
        seen["deferred"] = requesting_thread.get()
        complete_pended_preoperation(cbd, PreopCallbackStatus.SUCCESS_NO_CALLBACK)

    async def generic(objects: Any, context: Any) -> None:
        seen["generic"] = requesting_thread.get()
        generic_ran.set()

    def pre(cbd: CallbackData, objects: Any) -> PreopCallbackStatus:
        queue_generic_work_item(objects, generic)
        queue_deferred_io_work_item(cbd, objects, deferred)
        return PreopCallbackStatus.PENDING

    one_filter(driver, pre)
    token = requesting_thread.set(4242)  # as the kernel adapter does for a request of thread 4242
    try:
        with trio.fail_after(5):
            cbd = await driver.send(LookupParameters(ROOT_INODE, b"x"))
            await generic_ran.wait()
    finally:
        requesting_thread.reset(token)
    assert cbd.io_status.status is NtStatus.SUCCESS
    assert seen == {"deferred": 4242, "generic": 0}


def test_work_items_are_queued_from_the_daemons_trio_thread() -> None:
    with pytest.raises(RuntimeError, match="trio thread"):
        queue_generic_work_item(None, lambda objects, context: None)
