"""Contexts in-process: kinds, set/get/keep/replace, reference counts, lifetimes, rules and leak reports."""

from __future__ import annotations

import logging
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from fltfuse import (
    CallbackData,
    ContextError,
    ContextRegistration,
    ContextType,
    FilterRegistration,
    InstanceTeardownFlags,
    MajorFunction,
    NtStatus,
    OperationRegistration,
    PostopCallbackStatus,
    PostopFlags,
    PreopCallbackStatus,
    RegistrationError,
    SetContext,
    VerifierError,
    allocate_context,
    get_context,
    get_contexts,
    reference_context,
    release_context,
    set_context,
)
from fltfuse._stack import Filter, Instance
from fltfuse.testing import InProcessVolume

WITH = PreopCallbackStatus.SUCCESS_WITH_CALLBACK
NO = PreopCallbackStatus.SUCCESS_NO_CALLBACK
FINISHED = PostopCallbackStatus.FINISHED_PROCESSING
ALL = ContextType.VOLUME | ContextType.INSTANCE | ContextType.FILE | ContextType.STREAM | ContextType.STREAM_HANDLE


class Ctx:
    """A ctx-like filter: a stream context and a stream handle context per open, counting cleanups."""

    def __init__(self) -> None:
        self.cleanups: list[tuple[ContextType, str]] = []
        self.events: list[Any] = []

        def cleanup(context: Any, context_type: ContextType) -> None:
            self.cleanups.append((context_type, getattr(context, "label", "?")))

        def post_create(cbd: CallbackData, objects: Any, context: Any, flags: PostopFlags) -> PostopCallbackStatus:
            if cbd.io_status.status != NtStatus.SUCCESS or objects.file_object.handle is None:
                return FINISHED
            stream = allocate_context(objects, ContextType.STREAM)
            stream.label = f"stream-{objects.file_object.inode}"
            status, existing = set_context(objects, stream, SetContext.KEEP_IF_EXISTS)
            if existing is not None:  # another open set it first: use that one, drop ours
                self.events.append(("kept", status))
                release_context(stream)
                stream = existing
            release_context(stream)
            handle = allocate_context(objects, ContextType.STREAM_HANDLE)
            handle.label = f"handle-{objects.file_object.handle}"
            assert set_context(objects, handle) == (NtStatus.SUCCESS, None)
            release_context(handle)
            return FINISHED

        def pre_read(cbd: CallbackData, objects: Any) -> PreopCallbackStatus:
            found = get_contexts(objects, ALL)
            self.events.append(("read", sorted(t.name for t in found)))
            for context in found.values():
                release_context(context)
            return NO

        def pre_create(cbd: CallbackData, objects: Any) -> tuple[PreopCallbackStatus, None]:
            with pytest.raises(ContextError, match="pre-CREATE"):
                get_context(objects, ContextType.STREAM)
            return WITH, None

        self.filter = Filter(
            "ctx",
            FilterRegistration(
                operations=(
                    OperationRegistration(MajorFunction.CREATE, pre_create, post_create),
                    OperationRegistration(MajorFunction.READ, pre_read),
                ),
                contexts=tuple(
                    ContextRegistration(t, cleanup, size=16)
                    for t in (ContextType.VOLUME, ContextType.INSTANCE, ContextType.STREAM, ContextType.STREAM_HANDLE)
                ),
            ),
        )


@pytest.mark.trio
async def test_stream_and_handle_contexts_follow_opens_and_each_cleanup_runs_once(tmp_path: Path) -> None:
    ctx = Ctx()
    (tmp_path / "f").write_bytes(b"data")
    vol = InProcessVolume(tmp_path, [(ctx.filter, "300000")])
    ino = (tmp_path / "f").stat().st_ino
    first = await vol.open("f")
    second = await vol.open("f")  # keep-if-exists: the second open finds the first's stream context
    assert ctx.events == [("kept", NtStatus.FLT_CONTEXT_ALREADY_DEFINED)]
    assert ctx.cleanups == [(ContextType.STREAM, f"stream-{ino}")]  # the loser's, once
    assert await vol.read(first, 0, 4) == b"data"
    assert ctx.events[-1] == ("read", ["STREAM", "STREAM_HANDLE"])
    await vol.close_handle(first)
    assert ctx.cleanups[-1] == (ContextType.STREAM_HANDLE, f"handle-{first}")  # at the handle's CLOSE
    await vol.close_handle(second)
    assert ctx.cleanups[-1] == (ContextType.STREAM_HANDLE, f"handle-{second}")
    await vol.aclose()  # the stream context goes with the instance
    assert sorted(ctx.cleanups) == sorted(
        [
            (ContextType.STREAM, f"stream-{ino}"),
            (ContextType.STREAM_HANDLE, f"handle-{first}"),
            (ContextType.STREAM_HANDLE, f"handle-{second}"),
            (ContextType.STREAM, f"stream-{ino}"),
        ]
    )


def objects_of(stack_instance: Instance) -> Any:
    from fltfuse._stack.instance_stack import RelatedObjects

    return RelatedObjects(stack_instance.filter, stack_instance, stack_instance.volume, None)


def test_replace_returns_the_old_context_and_counts_decide_cleanup(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ctx = Ctx()
    vol = InProcessVolume(tmp_path, [(ctx.filter, "300000")])
    objects = objects_of(vol.stack.instances[0])
    one = allocate_context(objects, ContextType.INSTANCE)
    one.label = "one"
    assert set_context(objects, one) == (NtStatus.SUCCESS, None)
    two = allocate_context(objects, ContextType.INSTANCE)
    two.label = "two"
    status, old = set_context(objects, two, SetContext.REPLACE_IF_EXISTS)
    assert status is NtStatus.SUCCESS and old is one
    assert two.buffer == bytearray(16)
    release_context(one)  # the object's reference, handed over by the replace
    assert ctx.cleanups == []  # the allocation's reference is still ours
    release_context(one)
    assert ctx.cleanups == [(ContextType.INSTANCE, "one")]
    got = get_context(objects, ContextType.INSTANCE)
    assert got is two
    reference_context(two)
    for _ in range(3):
        release_context(two)  # get, reference, allocation
    assert ctx.cleanups == [(ContextType.INSTANCE, "one")]  # still set on the instance
    with pytest.raises(VerifierError, match=r"released .* once too often"):
        release_context(one)
    with pytest.raises(VerifierError, match="after its cleanup"):
        set_context(objects, one)
    vol.close()  # teardown: the instance's reference goes; cleanup after teardown complete
    assert ctx.cleanups == [(ContextType.INSTANCE, "one"), (ContextType.INSTANCE, "two")]


def test_leaks_are_listed_at_teardown_with_where_they_were_allocated(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ctx = Ctx()
    vol = InProcessVolume(tmp_path, [(ctx.filter, "300000")])
    objects = objects_of(vol.stack.instances[0])
    leaked = allocate_context(objects, ContextType.VOLUME)  # never set, never released
    volume = allocate_context(objects, ContextType.VOLUME)
    set_context(objects, volume)
    release_context(volume)  # fine: the volume holds it until dismount
    with caplog.at_level(logging.ERROR, logger="fltfuse.contexts"), pytest.raises(VerifierError, match="leaked"):
        vol.close()  # teardown completes, then the verifier fails the test
    assert "filter ctx (instance ctx Instance) leaked <VOLUME context of ctx, 1 reference(s)" in caplog.text
    assert "test_contexts.py" in caplog.text and caplog.text.count("leaked") == 1
    assert ctx.cleanups == [(ContextType.VOLUME, "?")]  # the volume's, at dismount; the leak never
    del leaked


def test_only_registered_types_and_valid_registrations(tmp_path: Path) -> None:
    ctx = Ctx()
    vol = InProcessVolume(tmp_path, [(ctx.filter, "300000")])
    with pytest.raises(ContextError, match="did not register FILE contexts") as info:
        allocate_context(objects_of(vol.stack.instances[0]), ContextType.FILE)
    assert info.value.status is NtStatus.FLT_INVALID_CONTEXT_REGISTRATION
    with pytest.raises(ContextError, match="needs a request's file"):
        get_context(objects_of(vol.stack.instances[0]), ContextType.STREAM)
    vol.close()
    twice = (ContextRegistration(ContextType.FILE), ContextRegistration(ContextType.FILE))
    with pytest.raises(RegistrationError, match=r"contexts\[1\].*FILE registered twice"):
        Filter("bad", FilterRegistration(contexts=twice))
    with pytest.raises(RegistrationError, match=r"contexts\[0\].*not a ContextRegistration"):
        Filter("bad", FilterRegistration(contexts=(ContextType.FILE,)))


async def test_a_volume_context_goes_with_the_filters_last_instance_on_the_volume(tmp_path: Path) -> None:
    ctx = Ctx()
    first = Instance(ctx.filter, "one", Decimal("300000"))
    second = Instance(ctx.filter, "two", Decimal("300001"))
    vol = InProcessVolume(tmp_path, [first, second])
    volume = allocate_context(objects_of(first), ContextType.VOLUME)
    volume.label = "shared"
    set_context(objects_of(first), volume)
    release_context(volume)
    await vol.stack.detach(first, InstanceTeardownFlags.MANUAL)
    assert ctx.cleanups == []  # the filter's other instance still uses it
    await vol.stack.detach(second, InstanceTeardownFlags.MANUAL)
    assert ctx.cleanups == [(ContextType.VOLUME, "shared")]  # not left for a dismount the filter may not see
    vol.close()
