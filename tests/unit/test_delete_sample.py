"""The delete sample in-process: each deletion is reported once, with its name, when the object is gone
(the kernel forgets it); failed requests, and files with a link left, are never reported."""

from __future__ import annotations

import errno
import json
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from fltfuse import (
    CallbackData,
    Filter,
    FilterRegistration,
    InstanceTeardownFlags,
    MajorFunction,
    OperationRegistration,
    PostopCallbackStatus,
    PostopFlags,
    PreopCallbackStatus,
    RelatedObjects,
    _loader,
)
from fltfuse.testing import InProcessVolume

from .test_ctx_sample import forget

PREFIX = "delete: deleted "


@pytest.fixture
def deletions(caplog: pytest.LogCaptureFixture) -> Iterator[Callable[[], list[tuple[str, str]]]]:
    """``deletions()``: (kind, path from the volume root) of each deletion reported so far, in order."""

    def reported() -> list[tuple[str, str]]:
        found = []
        for record in caplog.records:
            message = record.getMessage()
            if record.name == "fltfuse.filters.delete" and message.startswith(PREFIX):
                report = json.loads(message[len(PREFIX) :])
                found.append((report["kind"], report["name"]))
        return found

    with caplog.at_level(logging.INFO, logger="fltfuse.filters.delete"):
        yield reported


class Gate:
    """A filter below delete that holds each SET_INFORMATION until ``count`` of them are waiting, before it
    goes down and again before its post: requests the kernel could send at once really are in flight
    together, and all of them reached ext4 before delete's post-operations run."""

    def __init__(self, count: int):
        self.count = count
        self.arrived = {"pre": 0, "post": 0}
        self.opened = {"pre": trio.Event(), "post": trio.Event()}

    async def wait(self, phase: str) -> None:
        self.arrived[phase] += 1
        if self.arrived[phase] == self.count:
            self.opened[phase].set()
        with trio.fail_after(5):
            await self.opened[phase].wait()

    async def pre(self, cbd: CallbackData, objects: RelatedObjects) -> PreopCallbackStatus:
        await self.wait("pre")
        return PreopCallbackStatus.SUCCESS_WITH_CALLBACK

    async def post(
        self, cbd: CallbackData, objects: RelatedObjects, context: Any, flags: PostopFlags
    ) -> PostopCallbackStatus:
        await self.wait("post")
        return PostopCallbackStatus.FINISHED_PROCESSING

    def filter(self) -> tuple[Filter, str]:
        operation = OperationRegistration(MajorFunction.SET_INFORMATION, self.pre, self.post)
        return Filter("gate", FilterRegistration(operations=(operation,))), "47000"


@pytest.fixture
def volume(tmp_path: Path) -> Iterator[Callable[..., InProcessVolume]]:
    """``volume(files, gate=None)``: a delete volume over a fresh directory holding ``files`` (a value of
    None makes a directory), with ``gate`` below delete; closed after the test (a leaked context fails it)."""
    made: list[InProcessVolume] = []

    def make(files: dict[str, bytes | None], gate: Gate | None = None) -> InProcessVolume:
        directory = tmp_path / f"vol-{len(made)}"
        directory.mkdir()
        for name, data in files.items():
            (directory / name).parent.mkdir(parents=True, exist_ok=True)
            if data is None:
                (directory / name).mkdir()
            else:
                (directory / name).write_bytes(data)
        filters: list[Any] = ["delete"] if gate is None else ["delete", gate.filter()]
        vol = InProcessVolume(directory, filters)
        made.append(vol)
        return vol

    yield make
    for vol in made:
        if vol.stack.instances:
            vol.close()


def path(vol: InProcessVolume, name: str) -> str:
    return f"{vol.directory.absolute()}/{name}"


def test_the_inf_and_the_registration() -> None:
    loaded = _loader.load_filter(_loader.find_inf("delete"))
    instance = _loader.default_instance(loaded.filter, loaded.inf)
    assert instance is not None and instance.name == "Delete Instance" and instance.altitude == 370150
    assert set(instance.filter.operations) == {MajorFunction.SET_INFORMATION}
    assert [c.type.name for c in instance.filter.registration.contexts] == ["STREAM"]


async def test_rm_and_rmdir_are_reported_once_when_the_kernel_forgets_the_object(
    volume: Callable[..., InProcessVolume], deletions: Callable[[], list[tuple[str, str]]]
) -> None:
    vol = volume({"f": b"data", "d/e": None})
    f, e = await vol.lookup("f"), await vol.lookup("d/e")
    await vol.unlink("f")
    await vol.rmdir("d/e")
    assert deletions() == []  # the kernel still holds both inodes
    await forget(vol, f)
    await forget(vol, e)
    assert deletions() == [("file", path(vol, "f")), ("directory", path(vol, "d/e"))]
    assert not (vol.directory / "f").exists() and not (vol.directory / "d" / "e").exists()
    vol.close()
    assert len(deletions()) == 2  # nothing more at the unmount


async def test_an_object_the_kernel_never_looked_up_is_reported_at_once(
    volume: Callable[..., InProcessVolume], deletions: Callable[[], list[tuple[str, str]]]
) -> None:
    vol = volume({"f": b"data"})
    await vol.unlink("f")  # only the filter's own open held it: its close is the last reference
    assert deletions() == [("file", path(vol, "f"))]


async def test_an_open_file_is_reported_at_its_last_close(
    volume: Callable[..., InProcessVolume], deletions: Callable[[], list[tuple[str, str]]]
) -> None:
    vol = volume({"f": b"still readable"})
    first, second = await vol.open("f"), await vol.open("f")
    ino = await vol.lookup("f")
    await vol.unlink("f")
    await vol.close_handle(first)
    assert await vol.read(second, 0, 100) == b"still readable"  # the data lives until the last handle goes
    assert deletions() == []
    await vol.close_handle(second)
    await forget(vol, ino)  # what the kernel does after the last RELEASE of an unlinked file
    assert deletions() == [("file", path(vol, "f"))]


async def test_a_file_with_a_link_left_is_not_deleted_until_the_last_one_goes(
    volume: Callable[..., InProcessVolume], deletions: Callable[[], list[tuple[str, str]]]
) -> None:
    vol = volume({"f": b"shared"})
    os.link(vol.directory / "f", vol.directory / "h")
    ino = await vol.lookup("f")
    await vol.unlink("f")
    await forget(vol, ino)
    assert deletions() == []
    assert await vol.read_file("h") == b"shared"
    await vol.unlink("h")
    await forget(vol, ino)
    assert deletions() == [("file", path(vol, "h"))]


async def test_a_rename_onto_an_existing_file_deletes_the_replaced_one(
    volume: Callable[..., InProcessVolume], deletions: Callable[[], list[tuple[str, str]]]
) -> None:
    vol = volume({"new": b"new", "old": b"old", "moved": b"m", "empty": None, "full/x": b"x", "src": None})
    os.link(vol.directory / "old", vol.directory / "old-link")
    await vol.rename("new", "old")  # "old" still has a link ("old-link"): nothing deleted
    assert deletions() == []
    await vol.rename("old", "old-link")  # the last name of the first "old" goes
    await vol.rename("moved", "nothing-there")  # replaces nothing
    await vol.rename("src", "empty")  # a directory onto an empty directory
    with pytest.raises(OSError) as info:
        await vol.rename("empty", "full")
    assert info.value.errno in (errno.ENOTEMPTY, errno.EEXIST)
    assert deletions() == [("file", path(vol, "old-link")), ("directory", path(vol, "empty"))]
    assert (vol.directory / "old-link").read_bytes() == b"new"


async def test_exchange_and_noreplace_delete_nothing(
    volume: Callable[..., InProcessVolume], deletions: Callable[[], list[tuple[str, str]]]
) -> None:
    vol = volume({"a": b"a", "b": b"b"})
    await vol.rename("a", "b", 2)  # RENAME_EXCHANGE
    with pytest.raises(FileExistsError):
        await vol.rename("a", "b", 1)  # RENAME_NOREPLACE
    vol.close()
    assert deletions() == []


async def test_failed_deletions_are_never_reported_and_keep_their_errno(
    volume: Callable[..., InProcessVolume], deletions: Callable[[], list[tuple[str, str]]]
) -> None:
    vol = volume({"d/f": b"x", "e": None, "f": b"y"})
    with pytest.raises(FileNotFoundError):
        await vol.unlink("missing")
    with pytest.raises(IsADirectoryError):
        await vol.unlink("e")
    with pytest.raises(OSError) as info:
        await vol.rmdir("d")
    assert info.value.errno == errno.ENOTEMPTY
    with pytest.raises(NotADirectoryError):
        await vol.rmdir("f")
    vol.close()
    assert deletions() == []
    assert (vol.directory / "d" / "f").exists() and (vol.directory / "e").is_dir()


async def test_eight_parallel_unlinks_of_one_file_are_reported_once(
    volume: Callable[..., InProcessVolume], deletions: Callable[[], list[tuple[str, str]]]
) -> None:
    gate = Gate(8)
    vol = volume({"f": b"x"}, gate)
    ino = await vol.lookup("f")
    outcomes: list[int] = []

    async def unlink() -> None:
        try:
            await vol.unlink("f")
            outcomes.append(0)
        except OSError as exc:
            outcomes.append(exc.errno or 0)

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            for _ in range(8):
                nursery.start_soon(unlink)
    assert gate.arrived == {"pre": 8, "post": 8}  # all eight passed delete's pre before any reached ext4
    assert sorted(outcomes) == [0] + [errno.ENOENT] * 7
    await forget(vol, ino)
    assert deletions() == [("file", path(vol, "f"))]


async def test_two_names_of_one_file_removed_at_once_report_it_once(
    volume: Callable[..., InProcessVolume], deletions: Callable[[], list[tuple[str, str]]]
) -> None:
    gate = Gate(2)
    vol = volume({"a": b"x"}, gate)
    os.link(vol.directory / "a", vol.directory / "b")
    ino = await vol.lookup("a")
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(vol.unlink, "a")
            nursery.start_soon(vol.unlink, "b")
    await forget(vol, ino)
    (report,) = deletions()  # both posts saw no link left; one stream context, one cleanup
    assert report[1] in (path(vol, "a"), path(vol, "b"))


async def test_a_detach_reports_what_is_pending(
    volume: Callable[..., InProcessVolume], deletions: Callable[[], list[tuple[str, str]]]
) -> None:
    vol = volume({"f": b"x"})
    handle = await vol.open("f")
    await vol.unlink("f")
    (instance,) = vol.stack.instances
    await vol.stack.detach(instance, InstanceTeardownFlags.MANUAL)
    assert deletions() == [("file", path(vol, "f"))]  # its last name is gone; the instance will not see the close
    await vol.close_handle(handle)
