"""The filter manager's walk, in-process over the real passthrough backend: exact event orders."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import trio

from fltfuse import (
    CallbackData,
    CloseParameters,
    CreateDisposition,
    CreateParameters,
    FileType,
    LookupParameters,
    MajorFunction,
    NtStatus,
    ReadParameters,
    errno_from_status,
)
from fltfuse._backend import ROOT_INODE, PassthroughBackend
from fltfuse._registration import (
    FilterRegistration,
    OperationRegistration,
    PostopCallbackStatus,
    PostopFlags,
    PreopCallbackStatus,
    RegistrationError,
)
from fltfuse._stack import (
    Filter,
    Instance,
    InstanceStack,
    StackError,
    VerifierError,
    complete_pended_postoperation,
    complete_pended_preoperation,
)

from .conftest import Driver

WITH = PreopCallbackStatus.SUCCESS_WITH_CALLBACK
NO = PreopCallbackStatus.SUCCESS_NO_CALLBACK
COMPLETE = PreopCallbackStatus.COMPLETE
FINISHED = PostopCallbackStatus.FINISHED_PROCESSING


class Recorder:
    """Filters whose callbacks append (filter, phase, what they saw) to one shared list."""

    def __init__(self) -> None:
        self.events: list[tuple[str, ...]] = []

    def filter(
        self,
        name: str,
        major: MajorFunction,
        pre: Callable[[CallbackData], Any] | None = None,
        post: bool = True,
        status: PreopCallbackStatus = WITH,
    ) -> Filter:
        events = self.events

        def pre_cb(cbd: CallbackData, objects: Any) -> Any:
            events.append((name, "pre"))
            if pre is not None:
                result = pre(cbd)
                if result is not None:
                    return result
            return status, f"context-of-{name}"

        def post_cb(cbd: CallbackData, objects: Any, context: Any, flags: PostopFlags) -> PostopCallbackStatus:
            events.append((name, "post", str(context)))
            return FINISHED

        op = OperationRegistration(major, pre_cb, post_cb if post else None)
        return Filter(name, FilterRegistration(operations=(op,)))


def stack_of(driver: Driver, *filters: tuple[Filter, str]) -> InstanceStack:
    stack = InstanceStack(driver.backend, verifier=True)
    for f, altitude in filters:
        stack.attach(Instance(f, f"{f.name}-instance", Decimal(altitude)))
    driver.stack = stack
    return stack


async def open_file(driver: Driver, name: str) -> tuple[int, int]:
    look = LookupParameters(ROOT_INODE, name.encode())
    await driver.send(look)
    assert look.attributes is not None
    op = CreateParameters(CreateDisposition.OPEN, FileType.REGULAR, os.O_RDONLY, handle_requested=True)
    await driver.send(op, look.attributes.ino)
    assert op.handle is not None
    return look.attributes.ino, op.handle


async def test_pre_from_the_highest_altitude_down_and_post_back_up(driver: Driver) -> None:
    rec = Recorder()
    stack_of(
        driver,
        (rec.filter("a141000", MajorFunction.LOOKUP), "141000"),
        (rec.filter("c370030", MajorFunction.LOOKUP), "370030"),
        (rec.filter("b265000.5", MajorFunction.LOOKUP), "265000.5"),
        (rec.filter("other", MajorFunction.READ), "265001"),  # not registered for LOOKUP: no frame
    )
    (driver.root / "x").write_text("")
    cbd = await driver.send(LookupParameters(ROOT_INODE, b"x"))
    assert cbd.io_status.status is NtStatus.SUCCESS
    assert rec.events == [
        ("c370030", "pre"),
        ("b265000.5", "pre"),
        ("a141000", "pre"),
        ("a141000", "post", "context-of-a141000"),
        ("b265000.5", "post", "context-of-b265000.5"),
        ("c370030", "post", "context-of-c370030"),
    ]


async def test_no_callback_skips_the_post_and_only_posts_that_asked_run(driver: Driver) -> None:
    rec = Recorder()
    stack_of(
        driver,
        (rec.filter("top", MajorFunction.LOOKUP), "300000"),
        (rec.filter("mid", MajorFunction.LOOKUP, status=NO), "200000"),
        (rec.filter("pre-only", MajorFunction.LOOKUP, post=False, status=NO), "100000"),
    )
    (driver.root / "x").write_text("")
    await driver.send(LookupParameters(ROOT_INODE, b"x"))
    assert rec.events == [
        ("top", "pre"),
        ("mid", "pre"),
        ("pre-only", "pre"),
        ("top", "post", "context-of-top"),
    ]


async def test_complete_stops_the_descent_and_only_posts_above_run(driver: Driver) -> None:
    rec = Recorder()

    def deny(cbd: CallbackData) -> Any:
        cbd.io_status.status = NtStatus.ACCESS_DENIED
        return COMPLETE

    stack_of(
        driver,
        (rec.filter("above", MajorFunction.LOOKUP), "300000"),
        (rec.filter("denier", MajorFunction.LOOKUP, pre=deny), "200000"),
        (rec.filter("below", MajorFunction.LOOKUP), "100000"),
    )
    before = driver.backend.known_inodes()
    (driver.root / "x").write_text("")
    cbd = await driver.send(LookupParameters(ROOT_INODE, b"x"))
    assert errno_from_status(cbd.io_status.status) == 13  # EACCES
    assert driver.backend.known_inodes() == before  # the backend never saw it
    assert rec.events == [("above", "pre"), ("denier", "pre"), ("above", "post", "context-of-above")]


async def test_a_completing_filter_supplies_the_outputs(driver: Driver, tmp_path: Path) -> None:
    def answer(cbd: CallbackData) -> Any:
        assert isinstance(cbd.iopb.parameters, ReadParameters)
        cbd.iopb.parameters.data = b"from the filter"
        cbd.io_status.information = 15
        return COMPLETE

    rec = Recorder()
    stack_of(driver, (rec.filter("cache", MajorFunction.READ, pre=answer), "300000"))
    (driver.root / "abc").write_bytes(b"on disk")
    ino, fh = await open_file(driver, "abc")
    p = ReadParameters(0, 100)
    await driver.send(p, ino, fh)
    assert bytes(p.data or b"") == b"from the filter"


async def test_the_dirty_rule(driver: Driver) -> None:
    """Changes go down only with set_dirty(); each filter's pre and post see the same parameters."""
    seen: list[tuple[str, str, int]] = []

    def make(name: str, change: int | None, dirty: bool) -> Filter:
        def pre(cbd: CallbackData, objects: Any) -> Any:
            params = cbd.iopb.parameters
            assert isinstance(params, ReadParameters)
            seen.append((name, "pre", params.offset))
            if change is not None:
                params.offset = change
                if dirty:
                    cbd.set_dirty()
            return WITH

        def post(cbd: CallbackData, objects: Any, context: Any, flags: PostopFlags) -> PostopCallbackStatus:
            params = cbd.iopb.parameters
            assert isinstance(params, ReadParameters)
            seen.append((name, "post", params.offset))
            seen.append((name, "data", int.from_bytes(bytes(params.data or b"")[:1], "big")))
            return FINISHED

        return Filter(name, FilterRegistration(operations=(OperationRegistration(MajorFunction.READ, pre, post),)))

    stack_of(
        driver,
        (make("A", None, False), "400000"),
        (make("B", 10, True), "300000"),  # moves the read to offset 10, and says so
        (make("C", 20, False), "200000"),  # changes it without set_dirty(): ignored
        (make("D", None, False), "100000"),
    )
    (driver.root / "abc").write_bytes(b"abcdefghijklmnopqrstuvwxyz")
    ino, fh = await open_file(driver, "abc")
    p = ReadParameters(0, 3)
    await driver.send(p, ino, fh)
    assert bytes(p.data or b"") == b"klm"  # read at B's offset, not at C's
    assert p.offset == 0  # the caller's parameters are its own
    k = ord("k")
    assert seen == [
        ("A", "pre", 0),
        ("B", "pre", 0),
        ("C", "pre", 10),
        ("D", "pre", 10),
        ("D", "post", 10),
        ("D", "data", k),
        ("C", "post", 10),
        ("C", "data", k),
        ("B", "post", 0),  # B's post sees what B's pre saw
        ("B", "data", k),  # and the data read below
        ("A", "post", 0),
        ("A", "data", k),
    ]


async def test_pending_pre_completed_from_another_task(driver: Driver) -> None:
    parked: list[CallbackData] = []
    rec = Recorder()

    def park(cbd: CallbackData) -> Any:
        parked.append(cbd)
        return PreopCallbackStatus.PENDING

    stack_of(driver, (rec.filter("pender", MajorFunction.LOOKUP, pre=park), "300000"))
    (driver.root / "x").write_text("")
    result: list[CallbackData] = []

    async def request() -> None:
        result.append(await driver.send(LookupParameters(ROOT_INODE, b"x")))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(request)
        await trio.testing.wait_all_tasks_blocked()
        assert len(parked) == 1 and not result  # parked, not answered
        rec.events.append(("test", "completes"))
        complete_pended_preoperation(parked[0], WITH, "late context")
    assert result[0].io_status.status is NtStatus.SUCCESS
    assert rec.events == [("pender", "pre"), ("test", "completes"), ("pender", "post", "late context")]


async def test_pending_pre_completed_from_a_worker_thread(driver: Driver) -> None:
    rec = Recorder()

    def park(cbd: CallbackData) -> Any:
        return PreopCallbackStatus.PENDING

    stack_of(driver, (rec.filter("pender", MajorFunction.LOOKUP, pre=park), "300000"))
    (driver.root / "x").write_text("")

    async def request() -> CallbackData:
        return await driver.send(LookupParameters(ROOT_INODE, b"x"))

    async with trio.open_nursery() as nursery:
        done: list[CallbackData] = []

        async def run() -> None:
            done.append(await request())

        nursery.start_soon(run)
        await trio.testing.wait_all_tasks_blocked()
        (cbd,) = [c for c in _pended_cbds(driver)]
        await trio.to_thread.run_sync(complete_pended_preoperation, cbd, PreopCallbackStatus.SUCCESS_NO_CALLBACK)
    assert done[0].io_status.status is NtStatus.SUCCESS
    assert rec.events == [("pender", "pre")]


def _pended_cbds(driver: Driver) -> list[CallbackData]:
    return [c for c in driver.sent if c.pended is not None]


async def test_more_processing_required_delays_completion(driver: Driver) -> None:
    held: list[CallbackData] = []

    def post(cbd: CallbackData, objects: Any, context: Any, flags: PostopFlags) -> PostopCallbackStatus:
        held.append(cbd)
        return PostopCallbackStatus.MORE_PROCESSING_REQUIRED

    f = Filter(
        "slow",
        FilterRegistration(operations=(OperationRegistration(MajorFunction.LOOKUP, lambda c, o: WITH, post),)),
    )
    stack_of(driver, (f, "300000"))
    (driver.root / "x").write_text("")
    done: list[CallbackData] = []
    async with trio.open_nursery() as nursery:

        async def run() -> None:
            done.append(await driver.send(LookupParameters(ROOT_INODE, b"x")))

        nursery.start_soon(run)
        await trio.testing.wait_all_tasks_blocked()
        assert held and not done
        complete_pended_postoperation(held[0])
    assert done[0].io_status.status is NtStatus.SUCCESS


async def test_a_raising_filter_fails_the_request_and_the_next_one_is_served(
    driver: Driver, caplog: pytest.LogCaptureFixture
) -> None:
    calls: list[int] = []

    def boom(cbd: CallbackData) -> Any:
        calls.append(1)
        if len(calls) == 1:
            raise ValueError("filter bug")
        return None

    rec = Recorder()
    stack = stack_of(driver, (rec.filter("buggy", MajorFunction.LOOKUP, pre=boom), "300000"))
    stack.verifier = False
    (driver.root / "x").write_text("")
    with caplog.at_level(logging.ERROR, logger="fltfuse.stack"):
        cbd = await driver.send(LookupParameters(ROOT_INODE, b"x"))
    assert errno_from_status(cbd.io_status.status) == 5  # EIO
    assert "filter buggy (instance buggy-instance)" in caplog.text and "filter bug" in caplog.text
    assert "LOOKUP" in caplog.text
    ok = await driver.send(LookupParameters(ROOT_INODE, b"x"))  # the next request is served
    assert ok.io_status.status is NtStatus.SUCCESS


async def test_close_cannot_fail_even_when_a_filter_raises_or_completes_with_an_error(driver: Driver) -> None:
    def fail_close(cbd: CallbackData) -> Any:
        raise RuntimeError("bug in close")

    rec = Recorder()
    stack = stack_of(driver, (rec.filter("closer", MajorFunction.CLOSE, pre=fail_close), "300000"))
    stack.verifier = False
    (driver.root / "abc").write_bytes(b"x")
    ino, fh = await open_file(driver, "abc")
    cbd = await driver.send(CloseParameters(), ino, fh)
    assert cbd.io_status.status is NtStatus.SUCCESS
    with pytest.raises(OSError):
        os.fstat(fh)  # the backend closed it: the request went on down


async def test_verifier_rules(driver: Driver) -> None:
    no_post = Filter(
        "no-post", FilterRegistration(operations=(OperationRegistration(MajorFunction.LOOKUP, lambda c, o: WITH),))
    )
    stack_of(driver, (no_post, "300000"))
    (driver.root / "x").write_text("")
    with pytest.raises(VerifierError, match="SUCCESS_WITH_CALLBACK without a post"):
        await driver.send(LookupParameters(ROOT_INODE, b"x"))

    def change_major(cbd: CallbackData, objects: Any) -> Any:
        cbd.iopb.parameters = ReadParameters(0, 1)
        return NO

    swapper = Filter(
        "swapper", FilterRegistration(operations=(OperationRegistration(MajorFunction.LOOKUP, change_major),))
    )
    stack_of(driver, (swapper, "300000"))
    with pytest.raises(VerifierError, match="changed the major function"):
        await driver.send(LookupParameters(ROOT_INODE, b"x"))

    bad_status = Filter(
        "bad-status", FilterRegistration(operations=(OperationRegistration(MajorFunction.LOOKUP, lambda c, o: 42),))
    )
    stack_of(driver, (bad_status, "300000"))
    with pytest.raises(VerifierError, match="returned 42"):
        await driver.send(LookupParameters(ROOT_INODE, b"x"))


def test_altitudes_and_names_are_unique_per_volume(tmp_path: Path) -> None:
    stack = InstanceStack(PassthroughBackend(str(tmp_path)))
    f = Filter("f", FilterRegistration())
    stack.attach(Instance(f, "one", Decimal("300000")))
    with pytest.raises(StackError) as info:
        stack.attach(Instance(f, "two", Decimal("300000.0")))
    assert info.value.status is NtStatus.FLT_INSTANCE_ALTITUDE_COLLISION
    with pytest.raises(StackError) as info:
        stack.attach(Instance(f, "one", Decimal("300001")))
    assert info.value.status is NtStatus.FLT_INSTANCE_NAME_COLLISION
    stack.attach(Instance(f, "two", Decimal("300000.5")))  # one filter, two instances, two altitudes
    assert [i.name for i in stack.instances] == ["two", "one"]


def _pre(cbd: CallbackData, objects: Any) -> PreopCallbackStatus:
    return NO


def _post(cbd: CallbackData, objects: Any, context: Any, flags: PostopFlags) -> PostopCallbackStatus:
    return FINISHED


@pytest.mark.parametrize(
    ("operations", "message"),
    [
        ((OperationRegistration("READ", _pre),), "unknown major function"),  # type: ignore[arg-type]
        ((OperationRegistration(MajorFunction.POWER, _pre),), "(POWER): this major function cannot be registered"),
        ((OperationRegistration(MajorFunction.SHUTDOWN, _pre, _post),), "(SHUTDOWN): a post callback is not allowed"),
        ((OperationRegistration(MajorFunction.READ),), "(READ): neither a pre nor a post"),
        ((OperationRegistration(MajorFunction.READ, _pre), OperationRegistration(MajorFunction.READ, _pre)), "twice"),
        ((OperationRegistration(MajorFunction.READ, lambda cbd: NO),), "(READ) pre: <lambda>(cbd) does not take 2"),
        ((OperationRegistration(MajorFunction.READ, _pre, _pre),), "(READ) post: _pre(cbd, objects) does not take 4"),
        ((OperationRegistration(MajorFunction.READ, _pre, flags=0x40),), "(READ): unknown flags"),  # type: ignore[arg-type]
    ],
)
def test_registration_is_validated_at_load(operations: tuple[OperationRegistration, ...], message: str) -> None:
    with pytest.raises(RegistrationError) as info:
        Filter("scanner", FilterRegistration(operations=operations))
    assert str(info.value).startswith("filter 'scanner': operations[")
    assert message in str(info.value)


def lifecycle_filter(events: list[tuple[Any, ...]], name: str, answer: Any = None) -> Filter:
    def setup(objects: Any, flags: Any, device_type: str, fs_type: str) -> Any:
        events.append((name, "setup", flags, device_type, fs_type, objects.instance.name))
        return answer

    def teardown_start(objects: Any, reason: Any) -> None:
        events.append((name, "teardown-start", reason))

    def teardown_complete(objects: Any, reason: Any) -> None:
        events.append((name, "teardown-complete", reason))

    def unload(flags: Any) -> None:
        events.append((name, "unload"))

    registration = FilterRegistration(
        instance_setup=setup,
        instance_teardown_start=teardown_start,
        instance_teardown_complete=teardown_complete,
        filter_unload=unload,
    )
    return Filter(name, registration)


def test_setup_is_told_why_and_where_and_may_decline(tmp_path: Path) -> None:
    from fltfuse import InstanceSetupFlags, VolumeProperties

    events: list[tuple[Any, ...]] = []
    volume = VolumeProperties("ext4", "/dev/loop7", "/mnt/x", str(tmp_path))
    stack = InstanceStack(PassthroughBackend(str(tmp_path)), volume=volume)
    flags = InstanceSetupFlags.AUTOMATIC_ATTACHMENT | InstanceSetupFlags.NEWLY_MOUNTED_VOLUME
    stack.attach(Instance(lifecycle_filter(events, "yes"), "y", Decimal("300000")), flags)
    with pytest.raises(StackError) as info:
        stack.attach(Instance(lifecycle_filter(events, "no", NtStatus.FLT_DO_NOT_ATTACH), "n", Decimal("200000")))
    assert info.value.status is NtStatus.FLT_DO_NOT_ATTACH
    assert [i.name for i in stack.instances] == ["y"]
    assert stack.instances[0].volume == volume
    assert events == [
        ("yes", "setup", flags, "disk", "ext4", "y"),
        ("no", "setup", InstanceSetupFlags.MANUAL_ATTACHMENT, "disk", "ext4", "n"),
    ]


def test_a_raising_setup_declines_and_is_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    def setup(objects: Any, flags: Any, device_type: str, fs_type: str) -> Any:
        raise RuntimeError("setup bug")

    stack = InstanceStack(PassthroughBackend(str(tmp_path)))
    with caplog.at_level(logging.ERROR, logger="fltfuse.stack"), pytest.raises(StackError):
        stack.attach(Instance(Filter("buggy", FilterRegistration(instance_setup=setup)), "b", Decimal("300000")))
    assert stack.instances == [] and "setup bug" in caplog.text


def test_dismount_tears_down_from_the_top_then_unloads(tmp_path: Path) -> None:
    from fltfuse import InstanceTeardownFlags

    events: list[tuple[Any, ...]] = []
    stack = InstanceStack(PassthroughBackend(str(tmp_path)), verifier=True)
    low, high = lifecycle_filter(events, "low"), lifecycle_filter(events, "high")
    stack.attach(Instance(low, "l1", Decimal("100000")))
    stack.attach(Instance(high, "h", Decimal("300000")))
    stack.attach(Instance(low, "l2", Decimal("200000")))  # a second instance of one filter
    events.clear()
    stack.dismount()
    dismount = InstanceTeardownFlags.VOLUME_DISMOUNT
    assert events == [
        ("high", "teardown-start", dismount),
        ("high", "teardown-complete", dismount),
        ("low", "teardown-start", dismount),
        ("low", "teardown-complete", dismount),
        ("low", "teardown-start", dismount),
        ("low", "teardown-complete", dismount),
        ("high", "unload"),
        ("low", "unload"),
    ]
    assert stack.instances == []


def test_instance_callbacks_must_be_plain_functions() -> None:
    async def setup(objects: Any, flags: Any, device_type: str, fs_type: str) -> None:
        return None

    with pytest.raises(RegistrationError, match="instance_setup: must be a plain function"):
        Filter("f", FilterRegistration(instance_setup=setup))


async def test_skip_flags_choose_by_the_handles_io_kind(driver: Driver) -> None:
    """Page-cache traffic is paging I/O; O_DIRECT (or direct I/O) is non-cached non-paging I/O."""
    from fltfuse import FileObject, OperationFlags

    seen: list[tuple[str, bool]] = []

    def watcher(name: str, flags: OperationFlags) -> Filter:
        def pre(cbd: CallbackData, objects: Any) -> PreopCallbackStatus:
            seen.append((name, cbd.iopb.target_file_object.uncached))
            return NO

        return Filter(
            name, FilterRegistration(operations=(OperationRegistration(MajorFunction.READ, pre, None, flags),))
        )

    stack_of(
        driver,
        (watcher("all", OperationFlags.NONE), "300000"),
        (watcher("no-paging", OperationFlags.SKIP_PAGING_IO), "200000"),
        (watcher("no-direct", OperationFlags.SKIP_NON_CACHED_NON_PAGING_IO), "100000"),
        (watcher("no-dasd", OperationFlags.SKIP_NON_DASD_IO), "50000"),
    )
    (driver.root / "f").write_bytes(b"x" * 4096)
    ino, handle = await open_file(driver, "f")
    for flags in (os.O_RDONLY, os.O_RDONLY | os.O_DIRECT):
        fo = FileObject(ino, handle, flags)
        cbd = CallbackData(fo, ReadParameters(0, 4096), driver.me)
        await driver.stack.dispatch(cbd)
        assert cbd.io_status.status is NtStatus.SUCCESS
    assert seen == [("all", False), ("no-direct", False), ("all", True), ("no-paging", True)]


async def test_post_create_sees_the_object_made_or_opened_and_its_handle(driver: Driver) -> None:
    seen: list[tuple[str, int, int | None]] = []

    def pre(cbd: CallbackData, objects: Any) -> PreopCallbackStatus:
        seen.append(("pre", objects.file_object.inode, objects.file_object.handle))
        return WITH

    def post(cbd: CallbackData, objects: Any, context: Any, flags: PostopFlags) -> PostopCallbackStatus:
        seen.append(("post", objects.file_object.inode, objects.file_object.handle))
        return FINISHED

    flt = Filter("watch", FilterRegistration(operations=(OperationRegistration(MajorFunction.CREATE, pre, post),)))
    stack_of(driver, (flt, "300000"))
    (driver.root / "old").write_text("x")
    old_ino, old_handle = await open_file(driver, "old")
    new = CreateParameters(
        CreateDisposition.CREATE, FileType.REGULAR, os.O_RDWR, ROOT_INODE, b"new", 0o644, handle_requested=True
    )
    await driver.send(new)
    made = CreateParameters(CreateDisposition.CREATE, FileType.DIRECTORY, 0, ROOT_INODE, b"dir", 0o755)
    await driver.send(made)
    new_ino, dir_ino = (driver.root / "new").stat().st_ino, (driver.root / "dir").stat().st_ino
    assert seen == [
        ("pre", old_ino, None),
        ("post", old_ino, old_handle),
        ("pre", ROOT_INODE, None),  # a new object: the target is its directory until it exists
        ("post", new_ino, new.handle),
        ("pre", ROOT_INODE, None),
        ("post", dir_ino, None),
    ]
    assert new.handle is not None
