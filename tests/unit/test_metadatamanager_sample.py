"""The metadatamanager sample in-process: its metadata file, kept open with filter-initiated I/O, hidden and protected.

Each test makes volumes over directories under tmp_path with the real INF's
instance (altitude 370060); ``backing(...)`` reads the metadata file as it is
on disk, behind the volume's back.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import trio

from fltfuse import (
    FUSE_PRODUCES,
    CallbackData,
    CallbackDataFlags,
    ContextType,
    CreateDisposition,
    CreateParameters,
    DirectoryControlParameters,
    DispositionParameters,
    EaMinor,
    FileInformationClass,
    FileObject,
    FileType,
    Filter,
    FilterRegistration,
    Instance,
    InstanceTeardownFlags,
    LinkParameters,
    MajorFunction,
    NtStatus,
    OperationRegistration,
    Parameters,
    PostopCallbackStatus,
    PostopFlags,
    PreopCallbackStatus,
    Requestor,
    SetAttributesParameters,
    SetEaParameters,
    _loader,
    get_context,
    release_context,
    status_from_errno,
)
from fltfuse._stack import StackError
from fltfuse.testing import InProcessVolume

META = ".fltmeta"
ROOT = 1


def metadatamanager(**overrides: str) -> Instance:
    """The INF's default instance, with ``--param`` style overrides."""
    loaded = _loader.load_filter(_loader.find_inf("metadatamanager"), overrides)
    instance = _loader.default_instance(loaded.filter, loaded.inf)
    assert instance is not None
    return instance


def state(vol: InProcessVolume) -> Any:
    """The MetadataFile in the attached instance's volume context."""
    (instance,) = [i for i in vol.stack.instances if i.filter.name == "metadatamanager"]
    context = get_context(vol.stack.objects_of(instance, None), ContextType.VOLUME)
    assert context is not None
    release_context(context)
    return context.metadata  # type: ignore[attr-defined]


def backing(directory: Path) -> str:
    return (directory / META).read_text()


def known_inodes(vol: InProcessVolume) -> int:
    return vol.stack.backend.known_inodes()  # type: ignore[attr-defined,no-any-return]


async def request(vol: InProcessVolume, params: Parameters, inode: int = ROOT) -> NtStatus:
    """One request straight into the stack (as the kernel adapter sends it), on a FileObject of ``inode``."""
    cbd = CallbackData(FileObject(inode), params, Requestor(os.getpid(), 0, 0, 0o022))
    await vol.stack.dispatch(cbd)
    return NtStatus(cbd.io_status.status)


async def control(vol: InProcessVolume, value: bytes, minor: EaMinor = EaMinor.SET) -> NtStatus:
    """setxattr(MOUNT, user.metadatamanager, value)."""
    return await request(vol, SetEaParameters(minor, b"user.metadatamanager", value))


def cleanups(caplog: pytest.LogCaptureFixture) -> int:
    return caplog.text.count("metadata volume context cleaned up")


@pytest.fixture
def make_volume(tmp_path: Path) -> Iterator[Callable[..., InProcessVolume]]:
    """Volumes over tmp_path/vol (the same directory each time: a remount), metadatamanager attached."""
    made: list[InProcessVolume] = []

    def make(*filters: Any, directory: str = "vol", **params: str) -> InProcessVolume:
        path = tmp_path / directory
        path.mkdir(exist_ok=True)
        volume = InProcessVolume(path, [metadatamanager(**params), *filters])
        made.append(volume)
        return volume

    yield make
    for volume in made:
        if volume.stack.instances:  # not closed by the test
            volume.close()


@pytest.fixture(autouse=True)
def info_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="fltfuse")


# -- registration and configuration ---------------------------------------------------------------


def test_the_inf_and_the_registration() -> None:
    instance = metadatamanager()
    assert dict(instance.filter.parameters) == {"MetadataFile": META}
    assert (instance.name, instance.altitude) == ("MetadataManager Instance", Decimal(370060))
    registration = instance.filter.registration
    assert [c.type for c in registration.contexts] == [ContextType.VOLUME]
    assert set(instance.filter.operations) == {
        MajorFunction.LOOKUP,
        MajorFunction.CREATE,
        MajorFunction.SET_INFORMATION,
        MajorFunction.SET_EA,
        MajorFunction.DIRECTORY_CONTROL,
    }


@pytest.mark.parametrize("name", ["", ".", "..", "sub/file", "/abs"])
def test_a_name_that_is_not_one_name_in_the_root_makes_the_instance_decline(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, name: str
) -> None:
    with pytest.raises(StackError) as info:
        InProcessVolume(tmp_path, [metadatamanager(MetadataFile=name)])
    assert info.value.status == NtStatus.FLT_DO_NOT_ATTACH
    assert "is not a file name in the volume root" in caplog.text


async def test_a_second_instance_on_the_volume_declines(make_volume: Callable[..., InProcessVolume]) -> None:
    vol = make_volume()
    first = vol.stack.instances[0]
    second = Instance(first.filter, "Second", Decimal(370061))
    with pytest.raises(StackError) as info:
        vol.stack.attach(second)
    assert info.value.status == NtStatus.FLT_DO_NOT_ATTACH
    assert vol.stack.instances == [first]
    await vol.aclose()


# -- the file: opened at the first request, records, closed at teardown ------------------------------


async def test_the_first_request_opens_the_file_and_creates_are_recorded(
    make_volume: Callable[..., InProcessVolume], caplog: pytest.LogCaptureFixture
) -> None:
    vol = make_volume()
    assert not (vol.directory / META).exists()  # nothing has asked yet
    await vol.write_file("a.txt", b"a")
    assert state(vol).file_object is not None
    await vol.mkdir("dir")
    await vol.write_file("dir/with space", b"b")
    await vol.write_file("back\\slash\nnewline", b"c")
    await vol.write_file("a.txt", b"again")  # an open with O_TRUNC of an existing file: no new object
    assert backing(vol.directory) == (
        "open 1\n"
        "create regular /a.txt\n"
        "create directory /dir\n"
        "create regular /dir/with space\n"
        "create regular /back\\\\slash\\nnewline\n"
    )
    await vol.aclose()
    assert backing(vol.directory).endswith("create regular /back\\\\slash\\nnewline\nclose 1 volume_dismount\n")
    assert cleanups(caplog) == 1


async def test_concurrent_first_requests_open_the_file_once(make_volume: Callable[..., InProcessVolume]) -> None:
    vol = make_volume()
    async with trio.open_nursery() as nursery:
        for i in range(4):
            nursery.start_soon(vol.write_file, f"f{i}", b"")
    await vol.aclose()
    assert sorted(backing(vol.directory).splitlines()) == [
        "close 1 volume_dismount",
        *(f"create regular /f{i}" for i in range(4)),
        "open 1",
    ]


async def test_a_remount_reopens_the_file_and_appends(make_volume: Callable[..., InProcessVolume]) -> None:
    vol = make_volume()
    await vol.write_file("one", b"1")
    await vol.aclose()
    vol = make_volume()
    await vol.write_file("two", b"2")
    assert state(vol).session == 2
    await vol.aclose()
    assert backing(vol.directory) == (
        "open 1\ncreate regular /one\nclose 1 volume_dismount\nopen 2\ncreate regular /two\nclose 2 volume_dismount\n"
    )


async def test_a_torn_last_line_is_ended_before_the_next_record(make_volume: Callable[..., InProcessVolume]) -> None:
    vol = make_volume()
    (vol.directory / META).write_bytes(b"open 1\ncreate regular /x\nclo")  # a crash in the middle of a write
    await vol.write_file("y", b"y")
    await vol.aclose()
    assert backing(vol.directory) == (
        "open 1\ncreate regular /x\nclo\nopen 2\ncreate regular /y\nclose 2 volume_dismount\n"
    )


def test_an_unmount_after_the_loop_ended_closes_the_file(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The daemon's unmount: the trio loop has ended when the volume is dismounted; teardown complete still runs."""
    vol = InProcessVolume(tmp_path, [metadatamanager()])
    trio.run(vol.write_file, "a", b"a")
    vol.close()
    assert backing(tmp_path) == "open 1\ncreate regular /a\nclose 1 volume_dismount\n"
    assert cleanups(caplog) == 1
    assert "still open" not in caplog.text


async def test_a_dismount_inside_the_loop_cannot_close_the_file_and_says_so(
    make_volume: Callable[..., InProcessVolume], caplog: pytest.LogCaptureFixture
) -> None:
    """The misuse: a synchronous close() inside trio. The teardown coroutine cannot run; the cleanup reports it."""
    vol = make_volume()
    await vol.write_file("a", b"a")
    vol.close()
    assert "instance_teardown_complete did not run: the volume was dismounted inside a trio loop" in caplog.text
    assert "metadata file .fltmeta is still open at the volume context's cleanup" in caplog.text
    assert cleanups(caplog) == 1
    assert backing(vol.directory) == "open 1\ncreate regular /a\n"  # no close record


async def test_detach_closes_the_file_and_a_new_instance_reopens_it(
    make_volume: Callable[..., InProcessVolume], caplog: pytest.LogCaptureFixture
) -> None:
    vol = make_volume()
    baseline = known_inodes(vol)
    await vol.listdir()
    (instance,) = vol.stack.instances
    assert known_inodes(vol) == baseline + 1  # the file the instance holds open
    await vol.stack.detach(instance, InstanceTeardownFlags.MANUAL)
    assert known_inodes(vol) == baseline  # no lookup left behind
    assert cleanups(caplog) == 1
    assert backing(vol.directory) == "open 1\nclose 1 manual\n"
    assert META in await vol.listdir()  # nobody hides it now
    again = metadatamanager()
    vol.stack.attach(again)
    assert META not in await vol.listdir()
    assert state(vol).session == 2
    await vol.aclose()
    assert cleanups(caplog) == 2
    assert backing(vol.directory) == "open 1\nclose 1 manual\nopen 2\nclose 2 volume_dismount\n"


# -- releasing on request ---------------------------------------------------------------------------


async def test_release_closes_the_file_until_reacquired(make_volume: Callable[..., InProcessVolume]) -> None:
    vol = make_volume()
    await vol.write_file("before", b"x")
    held = known_inodes(vol)
    assert await control(vol, b"release") == NtStatus.SUCCESS
    assert state(vol).file_object is None
    assert known_inodes(vol) == held - 1  # the instance's handle and its lookup are gone
    assert backing(vol.directory) == "open 1\ncreate regular /before\nclose 1 released\n"
    await vol.write_file("while released", b"y")  # LOOKUPs and CREATEs do not reopen it
    assert sorted(await vol.listdir()) == ["before", "while released"]
    assert state(vol).file_object is None
    assert await control(vol, b"release") == NtStatus.SUCCESS  # again: nothing to do
    released = known_inodes(vol)
    assert await control(vol, b"reacquire") == NtStatus.SUCCESS
    assert state(vol).file_object is not None
    assert known_inodes(vol) == released + 1
    assert await control(vol, b"reacquire") == NtStatus.SUCCESS  # again: nothing to do
    assert backing(vol.directory) == (
        "open 1\ncreate regular /before\nclose 1 released\nopen 2\ncreate regular /while released\n"
    )
    await vol.aclose()


@pytest.mark.parametrize(("value", "minor"), [(b"lock", EaMinor.SET), (b"", EaMinor.REMOVE)])
async def test_other_control_values_are_invalid(
    make_volume: Callable[..., InProcessVolume], value: bytes, minor: EaMinor
) -> None:
    vol = make_volume()
    assert await control(vol, value, minor) == NtStatus.INVALID_PARAMETER
    assert state(vol).released is False
    await vol.aclose()


async def test_a_file_that_cannot_be_opened_is_released_until_reacquired(
    make_volume: Callable[..., InProcessVolume], caplog: pytest.LogCaptureFixture
) -> None:
    """A directory by that name: the open fails (its read: EISDIR), is logged, and leaves nothing behind."""
    vol = make_volume()
    (vol.directory / META).mkdir()
    baseline = known_inodes(vol)
    await vol.write_file("kept", b"k")
    assert "metadata file .fltmeta could not be opened" in caplog.text
    assert state(vol).released is True
    assert known_inodes(vol) == baseline + 1  # "kept"; nothing of the failed open
    assert await control(vol, b"reacquire") == status_from_errno(errno.EISDIR)  # still a directory
    (vol.directory / META).rmdir()
    assert await control(vol, b"reacquire") == NtStatus.SUCCESS
    assert backing(vol.directory) == "open 1\ncreate regular /kept\n"  # the record kept meanwhile
    await vol.aclose()


async def test_records_made_while_released_are_lost_at_teardown_with_a_warning(
    make_volume: Callable[..., InProcessVolume], caplog: pytest.LogCaptureFixture
) -> None:
    vol = make_volume()
    await control(vol, b"release")
    await vol.write_file("never written", b"x")
    await vol.aclose()
    assert "1 records made while metadata file .fltmeta was released are lost" in caplog.text
    assert not (vol.directory / META).exists()  # released before anything opened it


# -- hidden and protected -------------------------------------------------------------------------


async def test_the_file_is_hidden_and_users_cannot_make_move_or_remove_it(
    make_volume: Callable[..., InProcessVolume],
) -> None:
    vol = make_volume()
    await vol.write_file("other", b"other")
    await vol.mkdir("sub")
    assert sorted(await vol.listdir()) == ["other", "sub"]
    for attempt, code in [
        (vol.stat(META), errno.ENOENT),
        (vol.read_file(META), errno.ENOENT),
        (vol.write_file(META, b"mine"), errno.EACCES),  # O_CREAT of a name that "does not exist"
        (vol.mkdir(META), errno.EACCES),
        (vol.rename("other", META), errno.EACCES),
        (vol.rename(META, "stolen"), errno.EACCES),
        (vol.unlink(META), errno.EACCES),
    ]:
        with pytest.raises(OSError) as info:
            await attempt
        assert info.value.errno == code
    link = LinkParameters(ROOT, META.encode())
    assert await request(vol, link, await vol.lookup("other")) == NtStatus.ACCESS_DENIED
    # The name is reserved in the root only.
    await vol.write_file(f"sub/{META}", b"an ordinary file")
    assert await vol.listdir("sub") == [META]
    assert (
        backing(vol.directory) == "open 1\ncreate regular /other\ncreate directory /sub\ncreate regular /sub/.fltmeta\n"
    )
    await vol.aclose()


async def test_the_inode_is_protected_from_a_name_looked_up_before_the_instance_attached(tmp_path: Path) -> None:
    """The kernel may know the inode from before (a cached name): opens and changes of it are refused."""
    async with InProcessVolume(tmp_path, [metadatamanager()]) as first:
        await first.listdir()  # makes the file
    async with InProcessVolume(tmp_path) as vol:
        inode = await vol.lookup(META)  # no filter yet: the kernel now knows the name
        vol.stack.attach(metadatamanager())
        await vol.listdir()  # the instance opens the file
        opening = CreateParameters(CreateDisposition.OPEN, FileType.REGULAR, os.O_RDWR, handle_requested=True)
        for params in [
            opening,
            SetAttributesParameters(FileInformationClass.END_OF_FILE, size=0),
            LinkParameters(ROOT, b"alias"),
            SetEaParameters(EaMinor.SET, b"user.x", b"y"),
            DispositionParameters(ROOT, META.encode(), False),
        ]:
            assert await request(vol, params, inode) == NtStatus.ACCESS_DENIED, params
    assert backing(tmp_path) == "open 1\nclose 1 volume_dismount\nopen 2\nclose 2 volume_dismount\n"


class OneEntryAtATime:
    """A filter below that answers each listing with one entry only (as a backend batch may end)."""

    @staticmethod
    def post(cbd: CallbackData, objects: Any, context: Any, flags: PostopFlags) -> PostopCallbackStatus:
        params = cbd.iopb.parameters
        assert isinstance(params, DirectoryControlParameters)
        params.entries = params.entries[:1]
        return PostopCallbackStatus.FINISHED_PROCESSING

    filter = Filter(
        "oneentry",
        FilterRegistration(operations=(OperationRegistration(MajorFunction.DIRECTORY_CONTROL, post=post),)),
    )


async def test_a_listing_batch_of_only_the_file_does_not_end_the_listing(
    make_volume: Callable[..., InProcessVolume],
) -> None:
    vol = make_volume((OneEntryAtATime.filter, "100"))
    names = [f"f{i}" for i in range(8)]
    for name in names:
        (vol.directory / name).write_bytes(b"")  # before the metadata file: not all of them come before it
    await vol.stat("f0")  # the instance makes the metadata file
    while os.listdir(vol.directory)[-1] == META:  # the backend lists in the directory's own order
        names.append(f"f{len(names)}")
        await vol.write_file(names[-1], b"")
    assert len(names) < 100
    assert sorted(await vol.listdir()) == names
    await vol.aclose()


# -- who sees the instance's own I/O ---------------------------------------------------------------------


class Seen(NamedTuple):
    major: MajorFunction
    inode: int
    name: bytes
    generated: bool
    initiator: str | None
    listing: tuple[bytes, ...]


def tracer(name: str, seen: list[Seen]) -> Filter:
    """A filter that records every request it sees, and what each listing says on its way up."""

    def record(cbd: CallbackData, listing: tuple[bytes, ...]) -> None:
        params = cbd.iopb.parameters
        generated = bool(cbd.flags & CallbackDataFlags.GENERATED_IO)
        initiator = cbd.initiator.filter.name if cbd.initiator is not None else None
        inode = cbd.iopb.target_file_object.inode
        seen.append(Seen(params.MAJOR, inode, getattr(params, "name", b""), generated, initiator, listing))

    def pre(cbd: CallbackData, objects: Any) -> PreopCallbackStatus:
        record(cbd, ())
        return PreopCallbackStatus.SUCCESS_WITH_CALLBACK

    def post(cbd: CallbackData, objects: Any, context: Any, flags: PostopFlags) -> PostopCallbackStatus:
        params = cbd.iopb.parameters
        if isinstance(params, DirectoryControlParameters):
            record(cbd, tuple(entry.name for entry in params.entries))
        return PostopCallbackStatus.FINISHED_PROCESSING

    majors = sorted(FUSE_PRODUCES - {MajorFunction.FORGET})
    return Filter(name, FilterRegistration(operations=tuple(OperationRegistration(m, pre, post) for m in majors)))


async def test_filters_above_never_see_its_io_and_filters_below_see_it_flagged(
    make_volume: Callable[..., InProcessVolume],
) -> None:
    above: list[Seen] = []
    below: list[Seen] = []
    vol = make_volume((tracer("above", above), "380000"), (tracer("below", below), "360000"))
    await vol.write_file("a.txt", b"a")
    assert await vol.read_file("a.txt") == b"a"
    assert await vol.listdir() == ["a.txt"]
    await control(vol, b"release")
    await control(vol, b"reacquire")
    inode = state(vol).file_object.inode
    await vol.aclose()
    assert (
        backing(vol.directory) == "open 1\ncreate regular /a.txt\nclose 1 released\nopen 2\nclose 2 volume_dismount\n"
    )

    assert above, "the tracer above saw nothing"
    assert not [s for s in above if s.generated or s.inode == inode or META.encode() in (s.name, *s.listing)]
    mine = [s for s in below if s.generated]
    assert {s.initiator for s in mine} == {"metadatamanager"}
    assert not [s for s in below if not s.generated and s.inode == inode]
    assert {s.major for s in mine} - {MajorFunction.DIRECTORY_CONTROL} == {  # (a listing's batch of only the file)
        MajorFunction.LOOKUP,  # create_file's lookup of the name
        MajorFunction.CREATE,
        MajorFunction.READ,
        MajorFunction.WRITE,
        MajorFunction.FLUSH_BUFFERS,
        MajorFunction.CLEANUP,
        MajorFunction.CLOSE,
    }
    names = (MajorFunction.LOOKUP, MajorFunction.CREATE, MajorFunction.DIRECTORY_CONTROL)  # name the directory
    assert all(s.inode == inode for s in mine if s.major not in names)
    assert [s.name for s in mine if s.major is MajorFunction.LOOKUP] == [META.encode()] * 2
    assert [s.major for s in mine].count(MajorFunction.CLOSE) == 2  # released once, torn down once
    assert any(META.encode() in s.listing for s in below)  # below it, listings still show the file
    assert not any(META.encode() in s.listing for s in above)
