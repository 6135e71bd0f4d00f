"""Detaching under I/O, draining, unloading, and cancelling pended requests: exact event orders, in-process."""

from __future__ import annotations

import errno
import logging
import os
import signal
import subprocess
import sys
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import trio

from fltfuse import (
    CallbackData,
    CancelSafeQueue,
    FilterUnloadFlags,
    InstanceTeardownFlags,
    LookupParameters,
    MajorFunction,
    NtStatus,
    ReadParameters,
    Requestor,
    complete_pended_preoperation,
    errno_from_status,
)
from fltfuse._backend import ROOT_INODE
from fltfuse._inf import parse_inf
from fltfuse._loader import LoadedFilter
from fltfuse._manager import FilterManager, ManagerError
from fltfuse._registration import (
    FilterRegistration,
    OperationRegistration,
    PostopCallbackStatus,
    PostopFlags,
    PreopCallbackStatus,
)
from fltfuse._stack import Filter, Instance, InstanceStack, VerifierError, pending

from .conftest import Driver

_SAMPLE_INF = Path(__file__).resolve().parents[2] / "inf" / "passthrough.inf"

WITH = PreopCallbackStatus.SUCCESS_WITH_CALLBACK
NO = PreopCallbackStatus.SUCCESS_NO_CALLBACK
PENDING = PreopCallbackStatus.PENDING
FINISHED = PostopCallbackStatus.FINISHED_PROCESSING


class Trace:
    """A filter per name whose callbacks record (name, event, detail) and whose pre may pend."""

    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []
        self.parked: dict[str, list[CallbackData]] = {}

    def filter(
        self,
        name: str,
        *,
        pend: bool = False,
        query_teardown: Any = NtStatus.SUCCESS,
        unload: Any = NtStatus.SUCCESS,
        complete_on_teardown: bool = False,
    ) -> Filter:
        events, parked = self.events, self.parked.setdefault(name, [])

        def pre(cbd: CallbackData, objects: Any) -> Any:
            events.append((name, "pre"))
            if pend:
                parked.append(cbd)
                return PENDING
            return WITH

        def post(cbd: CallbackData, objects: Any, context: Any, flags: PostopFlags) -> PostopCallbackStatus:
            events.append((name, "post", flags))
            return FINISHED

        def teardown_start(objects: Any, reason: InstanceTeardownFlags) -> None:
            events.append((name, "teardown-start", reason))
            if complete_on_teardown:
                while parked:
                    complete_pended_preoperation(parked.pop(), NO)

        def teardown_complete(objects: Any, reason: InstanceTeardownFlags) -> None:
            events.append((name, "teardown-complete", reason))

        def on_query_teardown(objects: Any, flags: int) -> Any:
            events.append((name, "query-teardown"))
            return query_teardown

        def on_unload(flags: FilterUnloadFlags) -> Any:
            events.append((name, "unload", flags))
            return unload

        return Filter(
            name,
            FilterRegistration(
                operations=(OperationRegistration(MajorFunction.LOOKUP, pre, post),),
                instance_query_teardown=None if query_teardown is None else on_query_teardown,
                instance_teardown_start=teardown_start,
                instance_teardown_complete=teardown_complete,
                filter_unload=None if unload is None else on_unload,
            ),
        )


def attach(driver: Driver, *filters: tuple[Filter, str], drain_timeout: float = 5.0) -> InstanceStack:
    stack = InstanceStack(driver.backend, verifier=True, drain_timeout=drain_timeout)
    for f, altitude in filters:
        stack.attach(Instance(f, f.name, Decimal(altitude)))
    driver.stack = stack
    return stack


async def wait_for(predicate: Any) -> None:
    with trio.fail_after(5):
        while not predicate():
            await trio.sleep(0.001)


async def test_detach_drains_a_post_it_owes_with_the_draining_flag_and_never_calls_it_again(driver: Driver) -> None:
    (driver.root / "x").write_text("")
    trace = Trace()
    upper, lower = trace.filter("upper"), trace.filter("lower", pend=True)
    stack = attach(driver, (upper, "300000"), (lower, "200000"))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(driver.send, LookupParameters(ROOT_INODE, b"x"))
        await wait_for(lambda: trace.parked["lower"] and pending.is_pended(trace.parked["lower"][0], "pre-operation"))
        await stack.detach(stack.instances[0], InstanceTeardownFlags.MANUAL)
        assert [i.name for i in stack.instances] == ["lower"]
        nursery.start_soon(driver.send, LookupParameters(ROOT_INODE, b"x"))  # a new request: upper no longer sees it
        await wait_for(lambda: len(trace.parked["lower"]) == 2)
        complete_pended_preoperation(trace.parked["lower"].pop(0), WITH)
        complete_pended_preoperation(trace.parked["lower"].pop(0), WITH)
    manual = InstanceTeardownFlags.MANUAL
    assert trace.events == [
        ("upper", "pre"),
        ("lower", "pre"),
        ("upper", "teardown-start", manual),
        ("upper", "post", PostopFlags.DRAINING),
        ("upper", "teardown-complete", manual),
        ("lower", "pre"),
        ("lower", "post", PostopFlags.NONE),
        ("lower", "post", PostopFlags.NONE),
    ]
    assert all(c.io_status.status is NtStatus.SUCCESS for c in driver.sent)


async def test_a_filter_that_completes_its_pended_requests_at_teardown_start_detaches_at_once(driver: Driver) -> None:
    (driver.root / "x").write_text("")
    trace = Trace()
    stack = attach(driver, (trace.filter("queue", pend=True, complete_on_teardown=True), "300000"))
    async with trio.open_nursery() as nursery:
        for _ in range(3):
            nursery.start_soon(driver.send, LookupParameters(ROOT_INODE, b"x"))
        await wait_for(lambda: len(trace.parked["queue"]) == 3)
        with trio.fail_after(1):
            await stack.detach(stack.instances[0], InstanceTeardownFlags.FILTER_UNLOAD)
    assert trace.events[-2:] == [
        ("queue", "teardown-start", InstanceTeardownFlags.FILTER_UNLOAD),
        ("queue", "teardown-complete", InstanceTeardownFlags.FILTER_UNLOAD),
    ]
    assert [c.io_status.status for c in driver.sent] == [NtStatus.SUCCESS] * 3


async def test_a_request_never_completed_is_reported_with_the_filter_and_cancelled_after_the_drain_timeout(
    driver: Driver, caplog: pytest.LogCaptureFixture
) -> None:
    (driver.root / "x").write_text("")
    trace = Trace()
    stack = attach(driver, (trace.filter("forgetful", pend=True), "300000"), drain_timeout=0.2)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(driver.send, LookupParameters(ROOT_INODE, b"x"))
        await wait_for(lambda: trace.parked["forgetful"])
        started = trio.current_time()
        with caplog.at_level(logging.ERROR, logger="fltfuse.stack"):
            await stack.detach(stack.instances[0], InstanceTeardownFlags.MANUAL)
        assert 0.2 <= trio.current_time() - started < 2
    assert "filter forgetful (instance forgetful) still holds" in caplog.text
    assert "never completed its pended pre-operation" in caplog.text
    (cbd,) = driver.sent
    assert cbd.io_status.status is NtStatus.CANCELLED and errno_from_status(cbd.io_status.status) == errno.EINTR
    assert trace.events[-1] == ("forgetful", "teardown-complete", InstanceTeardownFlags.MANUAL)


async def test_completion_may_come_before_the_pre_returns_pending(driver: Driver) -> None:
    """A worker can be faster than the pre that queued the request."""

    def pre(cbd: CallbackData, objects: Any) -> PreopCallbackStatus:
        complete_pended_preoperation(cbd, NO)
        return PENDING

    attach(
        driver,
        (Filter("fast", FilterRegistration(operations=(OperationRegistration(MajorFunction.LOOKUP, pre),))), "1"),
    )
    (driver.root / "x").write_text("")
    with trio.fail_after(2):
        cbd = await driver.send(LookupParameters(ROOT_INODE, b"x"))
    assert cbd.io_status.status is NtStatus.SUCCESS and cbd.pended is None


# -- the filter manager: query teardown, unload ---------------------------------------------


def manager_of(driver: Driver, tmp_path: Path, *filters: Filter) -> FilterManager:
    stack = attach(driver)
    manager = FilterManager(stack)
    for number, f in enumerate(filters):
        inf = tmp_path / f"{f.name}.inf"
        inf.write_text(
            _SAMPLE_INF.read_text()
            .replace('"passthrough"', f'"{f.name}"')
            .replace('"PassThrough Instance"', f'"{f.name}"')
            .replace('"370030"', f'"{300000 + number}"')
        )
        manager.start(LoadedFilter(f, parse_inf(inf)))
    return manager


async def test_manual_detach_asks_query_teardown_which_may_refuse_or_be_missing(driver: Driver, tmp_path: Path) -> None:
    trace = Trace()
    manager = manager_of(
        driver,
        tmp_path,
        trace.filter("agrees"),
        trace.filter("refuses", query_teardown=NtStatus.FLT_DO_NOT_DETACH),
        trace.filter("silent", query_teardown=None),
    )
    trace.events.clear()
    await manager.detach("agrees")
    with pytest.raises(ManagerError, match="refused to detach") as refused:
        await manager.detach("refuses")
    with pytest.raises(ManagerError, match="no instance query teardown callback") as missing:
        await manager.detach("silent")
    assert refused.value.status is missing.value.status is NtStatus.FLT_DO_NOT_DETACH
    assert [i.filter.name for i in manager.stack.instances] == ["silent", "refuses"]
    assert trace.events == [
        ("agrees", "query-teardown"),
        ("agrees", "teardown-start", InstanceTeardownFlags.MANUAL),
        ("agrees", "teardown-complete", InstanceTeardownFlags.MANUAL),
        ("refuses", "query-teardown"),
    ]


async def test_unload_asks_the_filter_unless_mandatory_then_tears_down_every_instance(
    driver: Driver, tmp_path: Path
) -> None:
    trace = Trace()
    manager = manager_of(
        driver,
        tmp_path,
        trace.filter("stubborn", unload=NtStatus.FLT_DO_NOT_DETACH),
        trace.filter("nocallback", unload=None),
    )
    manager.attach("stubborn", "second", "100000")
    trace.events.clear()
    with pytest.raises(ManagerError, match="refused"):
        await manager.unload("stubborn")
    with pytest.raises(ManagerError, match="has no unload callback"):
        await manager.unload("nocallback")
    assert len(manager.stack.instances) == 3
    await manager.unload("stubborn", mandatory=True)
    await manager.unload("nocallback", mandatory=True)
    mandatory = InstanceTeardownFlags.MANDATORY_FILTER_UNLOAD
    assert trace.events == [
        ("stubborn", "unload", FilterUnloadFlags.NONE),
        ("stubborn", "unload", FilterUnloadFlags.MANDATORY),
        ("stubborn", "teardown-start", mandatory),
        ("stubborn", "teardown-complete", mandatory),
        ("stubborn", "teardown-start", mandatory),
        ("stubborn", "teardown-complete", mandatory),
        ("nocallback", "teardown-start", mandatory),
        ("nocallback", "teardown-complete", mandatory),
    ]
    assert manager.stack.instances == [] and manager.loaded == {}


async def test_several_instances_of_one_filter_each_see_the_request(driver: Driver, tmp_path: Path) -> None:
    trace = Trace()
    manager = manager_of(driver, tmp_path, trace.filter("multi"))
    manager.attach("multi", "two", "300000.5")
    manager.attach("multi", "three", "1")
    with pytest.raises(ManagerError, match=r"altitude 1\.000 is taken by multi/three"):
        manager.attach("multi", "four", "1.000")
    with pytest.raises(ManagerError, match="give an altitude"):
        manager.attach("multi", "five")
    (driver.root / "x").write_text("")
    trace.events.clear()
    await driver.send(LookupParameters(ROOT_INODE, b"x"))
    assert [i.name for i in manager.stack.instances] == ["two", "multi", "three"]
    assert trace.events == [("multi", "pre")] * 3 + [("multi", "post", PostopFlags.NONE)] * 3
    assert [(r["instance"], r["altitude"], r["attached"]) for r in manager.instances()] == [
        ("two", "300000.5", "manual"),
        ("multi", "300000", "automatic"),
        ("three", "1", "manual"),
    ]


# -- cancellation --------------------------------------------------------------------


def test_interrupted_sees_a_dead_caller_but_not_a_live_one_or_a_blocked_signal() -> None:
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import signal, sys, time; signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1});"
            " print(flush=True); time.sleep(30)",
        ],
        stdout=subprocess.PIPE,
    )
    try:
        assert child.stdout is not None and child.stdout.readline() == b"\n"
        me = Requestor(child.pid, 0, 0, 0)
        assert not pending.interrupted(me, True)
        child.send_signal(signal.SIGUSR1)  # pending, but blocked: the caller would not be interrupted
        assert not pending.interrupted(me, True)
        child.kill()
        child.wait()
        assert pending.interrupted(me, False)  # gone
    finally:
        child.kill()
        child.wait()
    assert not pending.interrupted(Requestor(os.getpid(), 0, 0, 0), True)


async def test_a_queued_request_whose_caller_dies_is_cancelled_through_the_queue(driver: Driver) -> None:
    queue = CancelSafeQueue()

    def pre(cbd: CallbackData, objects: Any) -> PreopCallbackStatus:
        assert queue.insert(cbd, "ctx")
        return PENDING

    flt = Filter("queued", FilterRegistration(operations=(OperationRegistration(MajorFunction.LOOKUP, pre),)))
    attach(driver, (flt, "300000"))
    (driver.root / "x").write_text("")
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        caller = Requestor(child.pid, os.geteuid(), os.getegid(), 0o022)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: driver.send(LookupParameters(ROOT_INODE, b"x"), requestor=caller))
            nursery.start_soon(lambda: driver.send(LookupParameters(ROOT_INODE, b"x")))  # a live caller
            await wait_for(lambda: len(queue) == 2)
            child.kill()
            await trio.to_thread.run_sync(child.wait)
            await wait_for(lambda: len(queue) == 1)
            survivor = queue.remove_next()
            assert survivor is not None and survivor[0].requestor.pid == os.getpid() and survivor[1] == "ctx"
            complete_pended_preoperation(survivor[0], NO)
    finally:
        child.kill()
        child.wait()
    [dead] = [c for c in driver.sent if c.requestor is caller]
    [alive] = [c for c in driver.sent if c.requestor is not caller]
    assert dead.io_status.status is NtStatus.CANCELLED
    assert alive.io_status.status is NtStatus.SUCCESS
    assert queue.remove_next() is None


async def test_the_queue_never_completes_a_request_twice(driver: Driver) -> None:
    """A worker that takes a request first owns it; a cancel that comes later does nothing."""
    queue = CancelSafeQueue()
    outcomes: list[str] = []

    def pre(cbd: CallbackData, objects: Any) -> PreopCallbackStatus:
        queue.insert(cbd)
        return PENDING

    flt = Filter("q", FilterRegistration(operations=(OperationRegistration(MajorFunction.READ, pre),)))
    attach(driver, (flt, "300000"))
    (driver.root / "f").write_bytes(b"abc")
    from .test_instance_stack import open_file

    ino, handle = await open_file(driver, "f")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(driver.send, ReadParameters(0, 3), ino, handle)
        await wait_for(lambda: len(queue) == 1)
        taken = queue.remove_next()
        assert taken is not None
        assert not pending.cancel(taken[0])  # its cancel routine was cleared when the worker took it
        outcomes.append("taken")
        await trio.to_thread.run_sync(complete_pended_preoperation, taken[0], NO)
    read = driver.sent[-1]
    assert read.io_status.status is NtStatus.SUCCESS and bytes(read.iopb.parameters.data) == b"abc"
    with pytest.raises(KeyError):
        queue.remove(read)


async def test_a_request_pended_too_long_is_reported_with_its_filter_while_it_waits(
    driver: Driver, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pending, "REPORT_AFTER", 0.05)
    (driver.root / "x").write_text("")
    trace = Trace()
    attach(driver, (trace.filter("slowpoke", pend=True), "300000"))
    with caplog.at_level(logging.WARNING, logger="fltfuse.stack"):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(driver.send, LookupParameters(ROOT_INODE, b"x"))
            await wait_for(lambda: "has kept" in caplog.text)
            complete_pended_preoperation(trace.parked["slowpoke"][0], NO)
    assert "filter slowpoke (instance slowpoke) has kept CallbackData(LOOKUP" in caplog.text
    assert driver.sent[0].io_status.status is NtStatus.SUCCESS


async def test_a_completion_for_a_request_that_was_not_pended_is_a_filter_bug(driver: Driver) -> None:
    def pre(cbd: CallbackData, objects: Any) -> PreopCallbackStatus:
        complete_pended_preoperation(cbd, NO)  # ...and then does not return PENDING
        return NO

    flt = Filter("confused", FilterRegistration(operations=(OperationRegistration(MajorFunction.LOOKUP, pre),)))
    attach(driver, (flt, "1"))
    (driver.root / "x").write_text("")
    with pytest.raises(VerifierError, match=r"filter confused .* completed a pended operation it did not pend"):
        await driver.send(LookupParameters(ROOT_INODE, b"x"))


async def test_a_worker_that_meets_a_request_being_cancelled_leaves_it_to_the_cancel_routine(driver: Driver) -> None:
    """The race between cancel() and remove_next(): exactly one side completes the request."""
    queue = CancelSafeQueue()

    def pre(cbd: CallbackData, objects: Any) -> PreopCallbackStatus:
        queue.insert(cbd)
        return PENDING

    attach(
        driver, (Filter("q", FilterRegistration(operations=(OperationRegistration(MajorFunction.LOOKUP, pre),))), "1")
    )
    (driver.root / "x").write_text("")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(driver.send, LookupParameters(ROOT_INODE, b"x"))
        await wait_for(lambda: len(queue) == 1)
        (cbd,) = driver.sent
        with pending._lock:  # cancel(), first half: the cancellation has begun
            cbd.pended.cancelled = True
            routine, cbd.pended.cancel_routine = cbd.pended.cancel_routine, None
        assert queue.remove_next() is None  # the worker must not take it
        routine(cbd)  # cancel(), second half
    assert cbd.io_status.status is NtStatus.CANCELLED and len(queue) == 0
