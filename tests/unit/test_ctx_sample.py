"""The ctx sample in-process: its four context types count what they see, follow renames, and each cleanup
runs once, at the lifetime the filter manager gives it (handle close, the kernel's forget, detach, unmount)."""

from __future__ import annotations

import json
import logging
import os
import re
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from fltfuse import InstanceTeardownFlags, MajorFunction, OperationFlags, _loader
from fltfuse.testing import InProcessVolume

CLEANUP = re.compile(r"^ctx: (INSTANCE|FILE|STREAM|STREAM_HANDLE) context cleanup (\{.*\})$")


@pytest.fixture
def reports(caplog: pytest.LogCaptureFixture) -> Iterator[Callable[[str], list[dict[str, Any]]]]:
    """``reports(KIND)``: the cleanup reports ctx has logged so far for contexts of that type, in order."""

    def of(kind: str) -> list[dict[str, Any]]:
        found = []
        for record in caplog.records:
            match = CLEANUP.match(record.getMessage())
            if record.name == "fltfuse.filters.ctx" and match and match.group(1) == kind:
                found.append(json.loads(match.group(2)))
        return found

    with caplog.at_level(logging.INFO, logger="fltfuse.filters.ctx"):
        yield of


@pytest.fixture
def volume(tmp_path: Path) -> Iterator[Callable[..., InProcessVolume]]:
    """``volume(files)``: a ctx volume over a fresh directory holding ``files``; closed after the test
    (a leaked context fails it)."""
    made: list[InProcessVolume] = []

    def make(files: dict[str, bytes] | None = None) -> InProcessVolume:
        directory = tmp_path / f"vol-{len(made)}"
        for name, data in (files or {}).items():
            (directory / name).parent.mkdir(parents=True, exist_ok=True)
            (directory / name).write_bytes(data)
        directory.mkdir(exist_ok=True)
        vol = InProcessVolume(directory, ["ctx"])
        made.append(vol)
        return vol

    yield make
    for vol in made:
        if vol.stack.instances:
            vol.close()


async def forget(vol: InProcessVolume, target: str | int) -> None:
    """The kernel forgets an inode (``target``: a path, or an inode whose names are gone): FORGET with
    every lookup the volume counted for it (the in-process volume never sends FORGET by itself)."""
    await vol.forget(target)


def name(vol: InProcessVolume, path: str) -> str:
    """The normalized name of ``path`` on ``vol``."""
    return f"{vol.directory.absolute()}/{path}"


def test_the_inf_and_the_registration() -> None:
    loaded = _loader.load_filter(_loader.find_inf("ctx"))
    instance = _loader.default_instance(loaded.filter, loaded.inf)
    assert instance is not None and instance.name == "Ctx Instance" and instance.altitude == 370070
    assert loaded.inf.load_order_group == "FSFilter Activity Monitor"
    operations = instance.filter.operations
    assert set(operations) == {
        MajorFunction.CREATE,
        MajorFunction.READ,
        MajorFunction.WRITE,
        MajorFunction.CLEANUP,
        MajorFunction.CLOSE,
        MajorFunction.SET_INFORMATION,
    }
    assert not operations[MajorFunction.READ].flags & OperationFlags.SKIP_PAGING_IO  # every READ here is paging I/O
    assert {c.type.name for c in instance.filter.registration.contexts} == {
        "INSTANCE",
        "FILE",
        "STREAM",
        "STREAM_HANDLE",
    }


async def test_two_opens_share_one_stream_context_and_have_a_handle_context_each(
    volume: Callable[..., InProcessVolume], reports: Callable[[str], list[dict[str, Any]]]
) -> None:
    vol = volume({"f": b"0123456789"})
    reader = await vol.open("f")
    writer = await vol.open("f", os.O_WRONLY)
    assert await vol.read(reader, 0, 4) == b"0123"  # the filter changes nothing
    assert await vol.read(reader, 4, 100) == b"456789"
    assert await vol.write(writer, 10, b"abc") == 3
    await vol.close_handle(reader)
    assert [(r["reads"], r["bytes_read"], r["writes"], r["cleanups"]) for r in reports("STREAM_HANDLE")] == [
        (2, 10, 0, 1)
    ]
    await vol.close_handle(writer)
    handles = reports("STREAM_HANDLE")
    assert [(r["writes"], r["bytes_written"], r["reads"], r["name"]) for r in handles[1:]] == [
        (1, 3, 0, name(vol, "f"))
    ]
    assert reports("STREAM") == [] and reports("FILE") == []  # the kernel still holds the inode
    await forget(vol, "f")
    (stream,) = reports("STREAM")
    assert stream["name"] == name(vol, "f")
    expected = {"opens": 2, "reads": 2, "bytes_read": 10, "writes": 1, "bytes_written": 3, "cleanups": 2, "closes": 2}
    assert {key: stream[key] for key in expected} == expected
    (file,) = reports("FILE")
    assert (file["name"], file["handles"]) == (name(vol, "f"), 0)
    assert (vol.directory / "f").read_bytes() == b"0123456789abc"


async def test_a_reopen_while_the_inode_is_cached_counts_in_the_same_stream_context(
    volume: Callable[..., InProcessVolume], reports: Callable[[str], list[dict[str, Any]]]
) -> None:
    vol = volume()
    await vol.write_file("f", b"one")
    assert await vol.read_file("f") == b"one"
    await forget(vol, "f")
    await vol.write_file("f", b"two")  # a new stream context: the first was cleaned up at the forget
    await forget(vol, "f")
    streams = reports("STREAM")
    assert [(s["opens"], s["writes"], s["reads"]) for s in streams] == [(2, 1, 2), (1, 1, 0)]
    assert streams[0]["serial"] != streams[1]["serial"]


async def test_a_rename_changes_the_stream_context_name_open_or_not(
    volume: Callable[..., InProcessVolume], reports: Callable[[str], list[dict[str, Any]]]
) -> None:
    vol = volume({"open": b"o", "closed": b"c", "dir/inside": b"i"})
    handle = await vol.open("open")
    assert await vol.read_file("closed") == b"c"
    assert await vol.read_file("dir/inside") == b"i"
    await vol.rename("open", "g")
    await vol.rename("closed", "h")
    await vol.rename("dir", "moved")  # the file below it is renamed too
    await vol.close_handle(handle)
    for path in ("g", "h", "moved/inside"):
        await forget(vol, path)
    assert [s["name"] for s in reports("STREAM")] == [name(vol, p) for p in ("g", "h", "moved/inside")]
    # the handle contexts keep the name the file was opened by
    assert [h["name"] for h in reports("STREAM_HANDLE")] == [name(vol, p) for p in ("closed", "dir/inside", "open")]


async def test_an_exchange_swaps_the_names_and_a_failed_rename_changes_none(
    volume: Callable[..., InProcessVolume], reports: Callable[[str], list[dict[str, Any]]]
) -> None:
    vol = volume({"a": b"a", "b": b"b"})
    assert await vol.read_file("a") == b"a"
    assert await vol.read_file("b") == b"b"
    await vol.rename("a", "b", 2)  # RENAME_EXCHANGE
    with pytest.raises(FileNotFoundError):
        await vol.rename("missing", "a")
    with pytest.raises(FileExistsError):
        await vol.rename("a", "b", 1)  # RENAME_NOREPLACE: the errno is ext4's
    await forget(vol, "a")
    await forget(vol, "b")
    assert [(s["name"], s["bytes_read"]) for s in reports("STREAM")] == [(name(vol, "a"), 1), (name(vol, "b"), 1)]
    assert (vol.directory / "a").read_bytes() == b"b"


async def test_every_cleanup_runs_once_and_the_instance_context_goes_last(
    volume: Callable[..., InProcessVolume],
    reports: Callable[[str], list[dict[str, Any]]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    vol = volume({"keep": b"kept"})
    await vol.mkdir("d")
    for i in range(3):
        await vol.write_file(f"d/{i}", b"x" * i)
        assert await vol.read_file(f"d/{i}") == b"x" * i
    assert sorted(await vol.listdir("d")) == ["0", "1", "2"]
    await forget(vol, "d/0")
    await vol.open("keep")  # still open at unmount: its contexts go at the teardown
    await vol.unlink("d/1")
    with pytest.raises(FileNotFoundError):
        await vol.open("nope")
    assert reports("INSTANCE") == []
    vol.close()
    assert caplog.records[-1].getMessage().startswith("ctx: INSTANCE context cleanup")
    (instance,) = reports("INSTANCE")
    assert instance["volume"] == str(vol.directory.absolute())
    assert instance["allocated"] == instance["cleaned"]
    assert instance["allocated"] == {"FILE": 5, "STREAM": 5, "STREAM_HANDLE": 8}  # keep, d, d/0..2; 8 opens
    serials: Counter[int] = Counter()
    for kind in ("FILE", "STREAM", "STREAM_HANDLE"):
        assert len(reports(kind)) == instance["allocated"][kind]
        serials.update(r["serial"] for r in reports(kind))
    assert set(serials.values()) == {1}  # no cleanup ran twice
    totals = instance["totals"]
    assert (totals["opens"], totals["closes"], totals["cleanups"], totals["writes"], totals["reads"]) == (8, 7, 6, 2, 5)


async def test_detach_cleans_up_every_context_while_the_volume_stays(
    volume: Callable[..., InProcessVolume], reports: Callable[[str], list[dict[str, Any]]]
) -> None:
    vol = volume({"f": b"data"})
    handle = await vol.open("f")
    (instance,) = vol.stack.instances
    await vol.stack.detach(instance, InstanceTeardownFlags.MANUAL)
    (report,) = reports("INSTANCE")
    assert report["allocated"] == report["cleaned"] == {"FILE": 1, "STREAM": 1, "STREAM_HANDLE": 1}
    assert await vol.read(handle, 0, 10) == b"data"  # the volume goes on without the filter
    await vol.close_handle(handle)
    assert len(reports("STREAM_HANDLE")) == 1


async def test_a_handle_opened_before_the_instance_attached_counts_in_the_totals_only(
    tmp_path: Path, reports: Callable[[str], list[dict[str, Any]]]
) -> None:
    (tmp_path / "f").write_bytes(b"before")
    vol = InProcessVolume(tmp_path)
    handle = await vol.open("f")
    vol.stack.attach(_loader.load(["ctx"])[0])
    assert await vol.read(handle, 0, 10) == b"before"
    await vol.close_handle(handle)
    vol.close()
    (report,) = reports("INSTANCE")
    assert (report["totals"]["reads"], report["totals"]["cleanups"], report["totals"]["closes"]) == (1, 1, 1)
    assert report["allocated"] == {}
