"""Filter-initiated I/O in-process: who sees it, what it does on disk, and what it never does (hang, leak, cancel).

Three instances of one tracing filter sit at altitudes 300 ("Top"), 200
("Middle") and 100 ("Bottom") over the real passthrough backend. Each records
every pre and post it gets as an :class:`Event` (instance, phase, major, the
LOOKUP's name, GENERATED_IO, TOP_OF_STACK_IO, the initiator's name), and runs
the hook a test put at (instance, phase, major), so a test can make any of
them issue I/O from inside its own callbacks. I/O an instance initiates from
outside a callback (as a worker would) is issued here with the related objects
the stack hands that instance.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import subprocess
from collections.abc import Awaitable, Callable, Iterator, Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import trio

from fltfuse import (
    CallbackData,
    CallbackDataFlags,
    Context,
    ContextRegistration,
    ContextType,
    CreateParameters,
    FileInformationClass,
    FileObject,
    Filter,
    FilterRegistration,
    Instance,
    LookupParameters,
    MajorFunction,
    NtStatus,
    OperationRegistration,
    PostopCallbackStatus,
    PostopFlags,
    PreopCallbackStatus,
    ReadParameters,
    RelatedObjects,
    SetAttributesParameters,
    allocate_callback_data,
    allocate_context,
    close_file,
    complete_cancelled,
    complete_pended_preoperation,
    create_file,
    flush_buffers,
    get_context,
    open_file_by_id,
    perform_io_asynchronously,
    perform_io_synchronously,
    query_information_file,
    read_file,
    release_context,
    set_cancel_completion,
    set_context,
    set_information_file,
    write_file,
)
from fltfuse._backend import ROOT_INODE
from fltfuse._stack import pending
from fltfuse.testing import InProcessVolume
from fltfuse.testing.in_process import _Caller

TRACED = (
    MajorFunction.LOOKUP,
    MajorFunction.CREATE,
    MajorFunction.READ,
    MajorFunction.WRITE,
    MajorFunction.QUERY_INFORMATION,
    MajorFunction.SET_INFORMATION,
    MajorFunction.FLUSH_BUFFERS,
    MajorFunction.CLEANUP,
    MajorFunction.CLOSE,
)
ALL = ("Top", "Middle", "Bottom")
ALTITUDES = {"Top": 300, "Middle": 200, "Bottom": 100}
GENERATED = CallbackDataFlags.GENERATED_IO
TOP_OF_STACK = CallbackDataFlags.TOP_OF_STACK_IO

Hook = Callable[[CallbackData, RelatedObjects], Awaitable[Any]]


class Event(NamedTuple):
    instance: str
    phase: str  # "pre" or "post"
    major: MajorFunction
    name: str  # the name a LOOKUP resolves, else ""
    generated: bool
    top_of_stack: bool
    initiator: str | None


class Tracer:
    """The tracing filter, its three instances, what they saw, and the hooks tests give them."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.hooks: dict[tuple[str, str, MajorFunction], Hook] = {}
        self.cleaned: list[tuple[ContextType, str]] = []  # (type, tag) of each context cleaned up
        registration = FilterRegistration(
            operations=tuple(OperationRegistration(major, self._pre, self._post) for major in TRACED),
            contexts=tuple(
                ContextRegistration(t, self._cleanup) for t in (ContextType.FILE, ContextType.STREAM_HANDLE)
            ),
        )
        self.filter = Filter("trace", registration)
        self.instances = {name: Instance(self.filter, name, Decimal(ALTITUDES[name])) for name in ALL}

    def _record(self, cbd: CallbackData, objects: RelatedObjects, phase: str) -> Hook | None:
        params = cbd.iopb.parameters
        self.events.append(
            Event(
                objects.instance.name,
                phase,
                params.MAJOR,
                os.fsdecode(params.name) if isinstance(params, LookupParameters) else "",
                bool(cbd.flags & GENERATED),
                bool(cbd.flags & TOP_OF_STACK),
                cbd.initiator.name if cbd.initiator is not None else None,
            )
        )
        return self.hooks.get((objects.instance.name, phase, params.MAJOR))

    async def _pre(self, cbd: CallbackData, objects: RelatedObjects) -> Any:
        hook = self._record(cbd, objects, "pre")
        result = await hook(cbd, objects) if hook is not None else None
        return PreopCallbackStatus.SUCCESS_WITH_CALLBACK if result is None else result

    async def _post(
        self, cbd: CallbackData, objects: RelatedObjects, context: Any, flags: PostopFlags
    ) -> PostopCallbackStatus:
        hook = self._record(cbd, objects, "post")
        if hook is not None:
            await hook(cbd, objects)
        return PostopCallbackStatus.FINISHED_PROCESSING

    def _cleanup(self, context: Context, context_type: ContextType) -> None:
        self.cleaned.append((context_type, context.tag))  # type: ignore[attr-defined]

    def hook(self, instance: str, phase: str, major: MajorFunction) -> Callable[[Hook], Hook]:
        def register(function: Hook) -> Hook:
            self.hooks[instance, phase, major] = function
            return function

        return register

    def objects(self, instance: str, file_object: FileObject | None = None) -> RelatedObjects:
        """What the stack hands ``instance``: the objects its I/O is initiated with."""
        stack = self.instances[instance].stack
        assert stack is not None, f"{instance} is not attached"
        return stack.objects_of(self.instances[instance], file_object)

    def take(self) -> list[Event]:
        events, self.events = self.events, []
        return events


def through(
    instances: Sequence[str],
    major: MajorFunction,
    name: str = "",
    *,
    initiator: str | None = None,
    top_of_stack: bool = False,
) -> list[Event]:
    """The events of one request that ``instances`` (top first) see: their pres down, then their posts up."""
    generated = initiator is not None
    pres = [Event(i, "pre", major, name, generated, top_of_stack, initiator) for i in instances]
    posts = [Event(i, "post", major, name, generated, top_of_stack, initiator) for i in reversed(instances)]
    return pres + posts


def data_read(cbd: CallbackData) -> bytes:
    """What a performed READ returned."""
    params = cbd.iopb.parameters
    assert isinstance(params, ReadParameters) and params.data is not None
    return bytes(params.data)


def below(initiator: str) -> tuple[str, ...]:
    return tuple(i for i in ALL if ALTITUDES[i] < ALTITUDES[initiator])


@pytest.fixture
def tracer() -> Tracer:
    return Tracer()


@pytest.fixture
def vol(tmp_path: Path, tracer: Tracer) -> Iterator[InProcessVolume]:
    """A volume over tmp_path/vol with d/e/f.txt, top.txt and an empty directory dir/, traced by Top, Middle, Bottom."""
    root = tmp_path / "vol"
    (root / "d" / "e").mkdir(parents=True)
    (root / "d" / "e" / "f.txt").write_bytes(b"0123456789")
    (root / "top.txt").write_bytes(b"at the top")
    (root / "dir").mkdir()
    volume = InProcessVolume(root, list(tracer.instances.values()))
    yield volume
    if volume.stack.instances:
        volume.close()


# -- 1. exactly which instances see which generated request -------------------------------------------------


@pytest.mark.parametrize("initiator", ALL)
async def test_generated_io_is_seen_only_by_the_instances_below_its_initiator(
    vol: InProcessVolume, tracer: Tracer, initiator: str
) -> None:
    objects = tracer.objects(initiator)
    seers = below(initiator)
    fo = await create_file(objects, "d/e/f.txt", os.O_RDWR)
    assert await read_file(objects, fo, 2, 3) == b"234"
    assert await write_file(objects, fo, 8, b"AB") == 2
    assert (await query_information_file(objects, fo)).size == 10
    after = await set_information_file(objects, fo, SetAttributesParameters(FileInformationClass.END_OF_FILE, size=9))
    assert after.size == 9
    await flush_buffers(objects, fo)
    await close_file(objects, fo)
    assert (vol.directory / "d/e/f.txt").read_bytes() == b"01234567A"

    expected = [
        *through(seers, MajorFunction.LOOKUP, "d", initiator=initiator),
        *through(seers, MajorFunction.LOOKUP, "e", initiator=initiator),
        *through(seers, MajorFunction.LOOKUP, "f.txt", initiator=initiator),
    ]
    for major in TRACED[1:]:  # CREATE, READ, WRITE, QUERY_INFORMATION, SET_INFORMATION, FLUSH, CLEANUP, CLOSE
        expected += through(seers, major, initiator=initiator)
    assert tracer.take() == expected
    assert all(i.recursions == 0 for i in tracer.instances.values())

    # The same file read by a caller of the volume: every instance sees it, none flagged.
    assert await vol.read_file("d/e/f.txt") == b"01234567A"
    seen = tracer.take()
    assert {e.instance for e in seen} == set(ALL)
    assert not any(e.generated or e.initiator for e in seen)


# -- 2. create_file and the calls on the instance's own handle ----------------------------------------------


async def test_create_file_opens_creates_and_refuses_like_open(vol: InProcessVolume, tracer: Tracer) -> None:
    objects = tracer.objects("Middle")
    backend = vol._backend
    base = backend.known_inodes()

    fo = await create_file(objects, "top.txt")
    assert fo.initiator is tracer.instances["Middle"] and fo.handle is not None
    assert await read_file(objects, fo, 0, 100) == b"at the top"
    assert await read_file(objects, fo, 100, 10) == b""  # at the end of the file: short
    await close_file(objects, fo)

    fo = await create_file(objects, "d/new.txt", os.O_WRONLY | os.O_CREAT, 0o600)
    assert stat.S_IMODE((vol.directory / "d/new.txt").stat().st_mode) == 0o600
    assert await write_file(objects, fo, 0, b"made by a filter") == 16
    assert (await query_information_file(objects, fo)).size == 16
    await close_file(objects, fo)
    assert (vol.directory / "d/new.txt").read_bytes() == b"made by a filter"

    fo = await create_file(objects, "d/new.txt", os.O_RDWR | os.O_TRUNC)
    assert (vol.directory / "d/new.txt").read_bytes() == b""
    await close_file(objects, fo)

    failures: list[tuple[str, int, type[OSError], int]] = [
        ("top.txt", os.O_WRONLY | os.O_CREAT | os.O_EXCL, FileExistsError, errno.EEXIST),
        ("d/missing.txt", os.O_RDONLY, FileNotFoundError, errno.ENOENT),
        ("nodir/x.txt", os.O_WRONLY | os.O_CREAT, FileNotFoundError, errno.ENOENT),
        ("top.txt/x", os.O_RDONLY, NotADirectoryError, errno.ENOTDIR),
        ("d/e/f.txt/x", os.O_WRONLY | os.O_CREAT, NotADirectoryError, errno.ENOTDIR),
        ("top.txt", os.O_RDONLY | os.O_DIRECTORY, NotADirectoryError, errno.ENOTDIR),
        ("d/../top.txt", os.O_RDONLY, OSError, errno.EINVAL),
        ("/", os.O_RDONLY, IsADirectoryError, errno.EISDIR),
    ]
    refused_before_any_io = ("d/../top.txt", "/")
    tracer.take()
    for path, flags, error, code in failures:
        with pytest.raises(error) as info:
            await create_file(objects, path, flags)
        assert info.value.errno == code, path
        assert backend.known_inodes() == base, f"{path}: a lookup was not given back"
        events = tracer.take()
        assert (events == []) is (path in refused_before_any_io), (path, events)
    assert not (vol.directory / "d/missing.txt").exists() and not (vol.directory / "nodir").exists()
    assert (vol.directory / "top.txt").read_bytes() == b"at the top"  # O_EXCL did not truncate it
    assert backend.known_inodes() == base


async def test_a_directory_is_opened_as_a_directory(vol: InProcessVolume, tracer: Tracer) -> None:
    objects = tracer.objects("Middle")
    base = vol._backend.known_inodes()
    for flags in (os.O_RDONLY, os.O_RDONLY | os.O_DIRECTORY):
        fo = await create_file(objects, "d/e", flags)
        assert fo.flags & os.O_DIRECTORY
        attributes = await query_information_file(objects, fo)
        assert stat.S_ISDIR(attributes.mode) and attributes.ino == (vol.directory / "d/e").stat().st_ino
        await flush_buffers(objects, fo)  # fsync(2) of the directory
        with pytest.raises(IsADirectoryError):
            await read_file(objects, fo, 0, 10)
        await close_file(objects, fo)
    assert vol._backend.known_inodes() == base


async def test_the_instances_own_handle_round_trips_against_the_backing_directory(
    vol: InProcessVolume, tracer: Tracer
) -> None:
    objects = tracer.objects("Middle")
    backing = vol.directory / "d/e/f.txt"
    base = vol._backend.known_inodes()
    fo = await create_file(objects, "d/e/f.txt", os.O_RDWR)
    assert await write_file(objects, fo, 4, b"wxyz") == 4
    assert backing.read_bytes() == b"0123wxyz89"  # no cache in between: on disk at once
    backing.write_bytes(b"changed behind the volume's back")
    assert await read_file(objects, fo, 0, 7) == b"changed"
    assert await write_file(objects, fo, 40, b"!") == 1  # past the end: a hole
    attributes = await query_information_file(objects, fo)
    assert (attributes.size, attributes.ino) == (41, backing.stat().st_ino)
    after = await set_information_file(objects, fo, SetAttributesParameters(FileInformationClass.END_OF_FILE, size=4))
    assert after.size == 4 and backing.read_bytes() == b"chan"
    after = await set_information_file(objects, fo, SetAttributesParameters(FileInformationClass.BASIC, mode=0o604))
    assert stat.S_IMODE(backing.stat().st_mode) == 0o604 and stat.S_IMODE(after.mode) == 0o604
    await flush_buffers(objects, fo)
    await close_file(objects, fo)
    assert fo.closed
    with pytest.raises(OSError) as info:
        await close_file(objects, fo)
    assert info.value.errno == errno.EBADF
    with pytest.raises(OSError) as info:
        await read_file(objects, fo, 0, 1)
    assert info.value.errno == errno.EBADF
    assert vol._backend.known_inodes() == base  # every lookup create_file counted was given back


async def test_a_file_the_kernel_knows_keeps_its_lookups_after_the_instance_closes_it(
    vol: InProcessVolume, tracer: Tracer
) -> None:
    """create_file's lookups add to the kernel's and are given back alone: the caller's inode stays known."""
    handle = await vol.open("top.txt")
    known = vol._backend.known_inodes()
    objects = tracer.objects("Bottom")
    fo = await create_file(objects, "top.txt")
    await close_file(objects, fo)
    assert vol._backend.known_inodes() == known
    assert await vol.read(handle, 0, 3) == b"at "
    await vol.close_handle(handle)


async def test_open_file_by_id_opens_a_known_inode_and_gives_its_lookup_back(
    vol: InProcessVolume, tracer: Tracer
) -> None:
    """FILE_OPEN_BY_FILE_ID: a file or directory the volume knows opens by its inode; the open counts a lookup
    that close_file gives back; an inode the volume does not know is ESTALE."""
    ino = await vol.lookup("top.txt")
    directory = await vol.lookup("dir")
    known = vol._backend.known_inodes()
    objects = tracer.objects("Middle")
    tracer.take()
    fo = await open_file_by_id(objects, ino, os.O_RDWR)
    assert fo.inode == ino and fo.handle is not None and fo.initiator is objects.instance
    seen = [(e.instance, e.major) for e in tracer.take() if e.phase == "pre"]
    assert seen == [("Bottom", MajorFunction.QUERY_INFORMATION), ("Bottom", MajorFunction.CREATE)], seen
    assert await read_file(objects, fo, 0, 3) == b"at "
    assert await write_file(objects, fo, 0, b"AT") == 2
    assert (vol.directory / "top.txt").read_bytes().startswith(b"AT ")
    await close_file(objects, fo)
    listing = await open_file_by_id(objects, directory)
    assert listing.flags & os.O_DIRECTORY
    await close_file(objects, listing)
    assert vol._backend.known_inodes() == known
    with pytest.raises(OSError) as info:
        await open_file_by_id(objects, 987654321)
    assert info.value.errno == errno.ESTALE


# -- 3. I/O on a FileObject taken from a request --------------------------------------------------------------


async def test_a_filter_reads_and_writes_through_the_callers_handle_below_itself(
    vol: InProcessVolume, tracer: Tracer
) -> None:
    peeked: list[bytes] = []
    refused: list[int] = []

    @tracer.hook("Middle", "post", MajorFunction.CREATE)
    async def peek(cbd: CallbackData, objects: RelatedObjects) -> None:
        if cbd.flags & GENERATED or cbd.io_status.status:
            return
        fo = objects.file_object
        assert fo is not None and fo.initiator is None  # the caller's FileObject, not the instance's
        peeked.append(await read_file(objects, fo, 0, 4))
        params = cbd.iopb.parameters
        assert isinstance(params, CreateParameters)
        if params.flags & os.O_ACCMODE == os.O_RDWR:
            assert await write_file(objects, fo, 0, b"AT") == 2
        try:
            await close_file(objects, fo)
        except OSError as exc:
            refused.append(exc.errno or 0)

    handle = await vol.open("top.txt")
    assert peeked == [b"at t"]
    assert refused == [errno.EINVAL]  # the caller's handle is closed by its opener, never by a filter
    assert tracer.take() == [
        *through(ALL, MajorFunction.LOOKUP, "top.txt"),
        Event("Top", "pre", MajorFunction.CREATE, "", False, False, None),
        Event("Middle", "pre", MajorFunction.CREATE, "", False, False, None),
        Event("Bottom", "pre", MajorFunction.CREATE, "", False, False, None),
        Event("Bottom", "post", MajorFunction.CREATE, "", False, False, None),
        Event("Middle", "post", MajorFunction.CREATE, "", False, False, None),
        *through(["Bottom"], MajorFunction.READ, initiator="Middle"),
        Event("Top", "post", MajorFunction.CREATE, "", False, False, None),
    ]
    assert await vol.read(handle, 0, 10) == b"at the top"  # the handle is still the caller's, and open
    await vol.close_handle(handle)

    handle = await vol.open("top.txt", os.O_RDWR)
    events = tracer.take()
    assert [(e.instance, e.phase, e.major) for e in events if e.generated] == [
        ("Bottom", "pre", MajorFunction.READ),
        ("Bottom", "post", MajorFunction.READ),
        ("Bottom", "pre", MajorFunction.WRITE),
        ("Bottom", "post", MajorFunction.WRITE),
    ]
    assert {e.initiator for e in events if e.generated} == {"Middle"}
    assert (vol.directory / "top.txt").read_bytes() == b"AT the top"
    assert await vol.read(handle, 0, 10) == b"AT the top"
    await vol.close_handle(handle)


# -- 4. callback data performed synchronously and asynchronously --------------------------------------------


async def test_allocated_callback_data_performed_synchronously(vol: InProcessVolume, tracer: Tracer) -> None:
    objects = tracer.objects("Middle")
    fo = await create_file(objects, "d/e/f.txt")
    tracer.take()
    read = ReadParameters(0, 1)
    cbd = allocate_callback_data(objects, fo, read)
    assert (cbd.requestor.pid, cbd.requestor.uid) == (os.getpid(), os.geteuid())  # the daemon's own request
    assert cbd.iopb.parameters is read
    read.length = 4  # filled in before it is performed
    await perform_io_synchronously(objects, cbd)
    assert (cbd.io_status.status, cbd.io_status.information) == (NtStatus.SUCCESS, 4)
    assert read.data is not None and bytes(read.data) == b"0123"
    assert cbd.initiator is tracer.instances["Middle"] and cbd.flags & GENERATED

    # A failure is the outcome, not an exception.
    lookup = LookupParameters(ROOT_INODE, b"missing")
    failed = allocate_callback_data(objects, FileObject(ROOT_INODE), lookup)
    await perform_io_synchronously(objects, failed)
    assert failed.io_status.status == NtStatus.OBJECT_NAME_NOT_FOUND and lookup.attributes is None
    assert tracer.take() == [
        *through(["Bottom"], MajorFunction.READ, initiator="Middle"),
        *through(["Bottom"], MajorFunction.LOOKUP, "missing", initiator="Middle"),
    ]
    await close_file(objects, fo)


async def test_asynchronous_io_runs_its_completion_plain_or_async(vol: InProcessVolume, tracer: Tracer) -> None:
    objects = tracer.objects("Middle")
    fo = await create_file(objects, "d/e/f.txt")
    completions: dict[str, tuple[bytes, NtStatus, Any]] = {}
    done = {"plain": trio.Event(), "async": trio.Event()}

    def plain(cbd: CallbackData, context: Any) -> None:
        completions["plain"] = (data_read(cbd), cbd.io_status.status, context)
        done["plain"].set()

    async def coroutine(cbd: CallbackData, context: Any) -> None:
        await trio.sleep(0)
        again = await read_file(objects, fo, 8, 2)  # a completion may issue I/O of its own
        completions["async"] = (data_read(cbd) + again, cbd.io_status.status, context)
        done["async"].set()

    tracer.take()
    perform_io_asynchronously(objects, allocate_callback_data(objects, fo, ReadParameters(0, 3)), plain, "first")
    perform_io_asynchronously(objects, allocate_callback_data(objects, fo, ReadParameters(3, 3)), coroutine, 2)
    assert completions == {}  # started, not performed yet: the call returns at once
    with trio.fail_after(5):
        for event in done.values():
            await event.wait()
    assert completions == {
        "plain": (b"012", NtStatus.SUCCESS, "first"),
        "async": (b"34589", NtStatus.SUCCESS, 2),
    }
    events = tracer.take()
    assert {(e.instance, e.major, e.generated, e.initiator) for e in events} == {
        ("Bottom", MajorFunction.READ, True, "Middle")
    }
    assert len(events) == 6  # three READs, each a pre and a post in Bottom only
    await close_file(objects, fo)


async def test_a_completion_that_raises_is_logged_and_contained(
    vol: InProcessVolume, tracer: Tracer, caplog: pytest.LogCaptureFixture
) -> None:
    objects = tracer.objects("Middle")
    fo = await create_file(objects, "top.txt")
    ran = trio.Event()

    def broken(cbd: CallbackData, context: Any) -> None:
        ran.set()
        raise RuntimeError("completion bug")

    failing = allocate_callback_data(objects, fo, ReadParameters(0, 2))
    with caplog.at_level(logging.ERROR, logger="fltfuse.stack"):
        perform_io_asynchronously(objects, failing, broken)
        with trio.fail_after(5):
            await ran.wait()
    assert failing.io_status.status == NtStatus.SUCCESS  # the I/O itself was done
    (record,) = [r for r in caplog.records if "asynchronous I/O completion raised" in r.getMessage()]
    assert "filter trace (instance Middle)" in record.getMessage() and "completion bug" in record.getMessage()
    # The daemon goes on: more I/O, asynchronous too, and the volume's own requests.
    second = trio.Event()
    perform_io_asynchronously(
        objects, allocate_callback_data(objects, fo, ReadParameters(0, 2)), lambda c, x: second.set()
    )
    with trio.fail_after(5):
        await second.wait()
    assert await read_file(objects, fo, 3, 3) == b"the"
    await close_file(objects, fo)
    assert await vol.read_file("top.txt") == b"at the top"


# -- 5. top-of-stack I/O -------------------------------------------------------------------------------------


async def test_top_of_stack_io_is_seen_from_the_top_and_passes_its_initiator_by(
    vol: InProcessVolume, tracer: Tracer, caplog: pytest.LogCaptureFixture
) -> None:
    objects = tracer.objects("Middle")
    others = ("Top", "Bottom")
    with caplog.at_level(logging.WARNING, logger="fltfuse.stack"):
        fo = await create_file(objects, "d/f2.txt", os.O_RDWR | os.O_CREAT, top_of_stack=True)
        assert await write_file(objects, fo, 0, b"top", top_of_stack=True) == 3
        assert await read_file(objects, fo, 0, 10, top_of_stack=True) == b"top"
        await close_file(objects, fo, top_of_stack=True)
    majors = [
        (MajorFunction.LOOKUP, "d"),
        (MajorFunction.LOOKUP, "f2.txt"),  # not there yet: the CREATE makes it
        (MajorFunction.CREATE, ""),
        (MajorFunction.WRITE, ""),
        (MajorFunction.READ, ""),
        (MajorFunction.CLEANUP, ""),
        (MajorFunction.CLOSE, ""),
    ]
    expected = []
    for major, name in majors:
        expected += through(others, major, name, initiator="Middle", top_of_stack=True)
    assert tracer.take() == expected
    assert tracer.instances["Middle"].recursions == len(majors)
    passed = [r for r in caplog.records if "came back to it; passed it by" in r.getMessage()]
    assert len(passed) == len(majors) and all(r.levelno == logging.WARNING for r in passed)
    assert (vol.directory / "d/f2.txt").read_bytes() == b"top"


async def test_top_of_stack_io_from_inside_the_initiators_own_pre_operation(
    vol: InProcessVolume, tracer: Tracer
) -> None:
    """Middle, in its pre-READ, reads the same file at the top of the stack: no re-entry, no hang.

    Were the read to come back into Middle, its pre-READ would issue it again,
    without end; the hook notes a re-entry and stops there, so that the test
    fails instead of recursing.
    """
    read_inside: list[bytes] = []
    reentered: list[CallbackData] = []

    @tracer.hook("Middle", "pre", MajorFunction.READ)
    async def reread(cbd: CallbackData, objects: RelatedObjects) -> None:
        assert objects.file_object is not None
        if cbd.flags & GENERATED:
            reentered.append(cbd)
            return
        await trio.sleep(0)  # a checkpoint: a hang here would meet the fail_after
        read_inside.append(await read_file(objects, objects.file_object, 0, 6, top_of_stack=True))

    handle = await vol.open("top.txt")
    tracer.take()
    with trio.fail_after(5):
        assert await vol.read(handle, 3, 3) == b"the"
    assert reentered == []
    assert read_inside == [b"at the"]
    assert tracer.instances["Middle"].recursions == 1
    user = [Event(i, p, MajorFunction.READ, "", False, False, None) for i, p in [("Top", "pre"), ("Middle", "pre")]]
    assert tracer.take() == [
        *user,
        *through(("Top", "Bottom"), MajorFunction.READ, initiator="Middle", top_of_stack=True),
        Event("Bottom", "pre", MajorFunction.READ, "", False, False, None),
        Event("Bottom", "post", MajorFunction.READ, "", False, False, None),
        Event("Middle", "post", MajorFunction.READ, "", False, False, None),
        Event("Top", "post", MajorFunction.READ, "", False, False, None),
    ]
    await vol.close_handle(handle)


# -- 6. contexts on the instance's own handle -----------------------------------------------------------------


async def test_contexts_on_generated_io_go_when_the_instance_closes_its_handle(
    vol: InProcessVolume, tracer: Tracer
) -> None:
    seen_below: list[str | None] = []

    def tagged(objects: RelatedObjects, context_type: ContextType, tag: str) -> None:
        context = allocate_context(objects, context_type)
        context.tag = tag  # type: ignore[attr-defined]
        status, _ = set_context(objects, context)
        assert status == NtStatus.SUCCESS
        release_context(context)  # the object holds its own reference

    @tracer.hook("Bottom", "post", MajorFunction.CREATE)
    async def on_open(cbd: CallbackData, objects: RelatedObjects) -> None:
        if cbd.flags & GENERATED:
            tagged(objects, ContextType.STREAM_HANDLE, "bottom handle")
            tagged(objects, ContextType.FILE, "bottom file")

    @tracer.hook("Bottom", "pre", MajorFunction.READ)
    async def on_read(cbd: CallbackData, objects: RelatedObjects) -> None:
        context = get_context(objects, ContextType.STREAM_HANDLE)
        seen_below.append(None if context is None else context.tag)  # type: ignore[attr-defined]
        if context is not None:
            release_context(context)

    objects = tracer.objects("Middle")
    fo = await create_file(objects, "dir/ctx.txt", os.O_RDWR | os.O_CREAT)
    tagged(tracer.objects("Middle", fo), ContextType.STREAM_HANDLE, "middle handle")
    await write_file(objects, fo, 0, b"x")
    assert await read_file(objects, fo, 0, 1) == b"x"
    assert seen_below == ["bottom handle"]  # the handle's context, found on the instance's own handle
    assert tracer.cleaned == []
    await close_file(objects, fo)
    assert sorted(tracer.cleaned) == sorted(
        [
            (ContextType.STREAM_HANDLE, "middle handle"),
            (ContextType.STREAM_HANDLE, "bottom handle"),
            (ContextType.FILE, "bottom file"),  # the volume forgot the inode: nobody else knew it
        ]
    )
    vol.close()  # the verifier finds no leak


# -- 7. pended generated I/O is not the caller's to cancel --------------------------------------------------


async def test_a_pended_generated_request_is_never_cancelled_by_the_caller_watch(
    vol: InProcessVolume, tracer: Tracer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every caller looks interrupted: the pended user READ is cancelled, the pended generated READ waits.

    The user's file is opened by a child process (the READ's requestor); the
    generated READ's requestor is the daemon, which the watch never looks at.
    """
    watched: list[int] = []

    def everyone_interrupted(requestor: Any, synchronous: bool) -> bool:
        watched.append(requestor.pid)
        return True

    monkeypatch.setattr(pending, "interrupted", everyone_interrupted)
    pended: list[CallbackData] = []

    @tracer.hook("Bottom", "pre", MajorFunction.READ)
    async def hold(cbd: CallbackData, objects: RelatedObjects) -> PreopCallbackStatus:
        assert set_cancel_completion(cbd, complete_cancelled) == NtStatus.SUCCESS
        pended.append(cbd)
        return PreopCallbackStatus.PENDING

    objects = tracer.objects("Middle")
    fo = await create_file(objects, "top.txt")
    child = subprocess.Popen(["sleep", "30"])
    try:
        vol._caller = _Caller(child.pid, os.geteuid(), os.getegid(), 0o022)
        handle = await vol.open("top.txt")
        outcomes: dict[str, Any] = {}

        async def generated_read() -> None:
            outcomes["generated"] = await read_file(objects, fo, 0, 2)

        async def user_read() -> None:
            try:
                outcomes["user"] = await vol.read(handle, 0, 2)
            except OSError as exc:
                outcomes["user"] = exc.errno

        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(generated_read)
                while not pended:
                    await trio.sleep(0)
                nursery.start_soon(user_read)  # pended after the generated one: a watch of it would fire first
                while "user" not in outcomes:
                    await trio.sleep(pending.WATCH_INTERVAL / 4)
                generated = pended[0]
                assert generated.initiator is tracer.instances["Middle"]
                assert generated.requestor.pid == os.getpid() and not pending.watches_caller(generated)
                assert pending.is_pended(generated, "pre-operation")  # still held: its caller is the daemon
                assert "generated" not in outcomes
                complete_pended_preoperation(generated, PreopCallbackStatus.SUCCESS_WITH_CALLBACK)
        assert outcomes == {"user": errno.EINTR, "generated": b"at"}
        assert set(watched) == {child.pid}  # the watch looked at the user's opener only
        await vol.close_handle(handle)
    finally:
        child.kill()
        child.wait()
    await close_file(objects, fo)
