"""The namechanger sample in-process: a real directory grafted at another place, hidden at its own, named there."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Iterator, Mapping
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

import filters.namechanger as namechanger
from fltfuse import (
    CallbackData,
    CreateParameters,
    DirectoryControlParameters,
    FileType,
    Filter,
    FilterRegistration,
    LookupParameters,
    MajorFunction,
    NameFormat,
    NtStatus,
    OperationRegistration,
    PostopCallbackStatus,
    PostopFlags,
    PreopCallbackStatus,
    RelatedObjects,
    get_file_name_information,
)
from fltfuse._stack import StackError
from fltfuse.testing import InProcessVolume

GRAFT = {"RealMapping": "a/b", "UserMapping": "x/y"}


@pytest.fixture
def make_volume(tmp_path: Path) -> Iterator[Callable[..., InProcessVolume]]:
    """Volumes over tmp_path/vol-N holding ``files`` (path -> bytes, or None for a directory), with namechanger."""
    made: list[InProcessVolume] = []

    def make(
        files: Mapping[str, bytes | None],
        parameters: Mapping[str, str] = GRAFT,
        extra: tuple[tuple[Filter, str], ...] = (),
    ) -> InProcessVolume:
        directory = tmp_path / f"vol-{len(made)}"
        directory.mkdir()
        for name, data in files.items():
            path = directory / name
            if data is None:
                path.mkdir(parents=True, exist_ok=True)
            else:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(data)
        volume = InProcessVolume(directory, ["namechanger", *extra], parameters={"namechanger": dict(parameters)})
        made.append(volume)
        return volume

    yield make
    for volume in made:
        volume.close()


def lookups_held(volume: InProcessVolume, ino: int) -> int:
    """How many lookups of ``ino`` the backend counts (what FORGETs must give back)."""
    node = volume._backend._table.get(ino)
    return 0 if node is None else node.lookups


TREE: dict[str, bytes | None] = {"a/b/f": b"grafted\n", "a/b/sub/g": b"deeper\n", "a/keep": b"stays\n", "x": None}


async def test_the_real_directory_appears_at_the_user_mapping_and_nowhere_else(
    make_volume: Callable[..., InProcessVolume],
) -> None:
    vol = make_volume(TREE)
    assert sorted(await vol.listdir(".")) == ["a", "x"]
    assert await vol.listdir("a") == ["keep"]  # b is hidden
    assert await vol.listdir("x") == ["y"]  # the graft, though x is empty on disk
    assert sorted(await vol.listdir("x/y")) == ["f", "sub"]
    assert await vol.read_file("x/y/f") == b"grafted\n"
    assert await vol.read_file("x/y/sub/g") == b"deeper\n"
    assert (await vol.stat("x/y")).st_ino == os.stat(vol.directory / "a/b").st_ino
    for hidden in ("a/b", "a/b/f"):
        with pytest.raises(FileNotFoundError):
            await vol.lookup(hidden)
    assert await vol.lookup("x/y/..") == await vol.lookup("x")  # the kernel's ".." lookup (NFS export)


async def test_the_graft_entry_is_counted_and_given_back(make_volume: Callable[..., InProcessVolume]) -> None:
    """The listing of x holds the real directory open only until the next request on its handle."""
    vol = make_volume(TREE)
    graft = os.stat(vol.directory / "a/b").st_ino
    assert lookups_held(vol, graft) == 0
    assert await vol.listdir("x") == ["y"]  # the harness takes the entry: the kernel's one lookup
    assert lookups_held(vol, graft) == 1  # that one, and none of the filter's (closed by the listing's last request)


async def test_a_batch_that_held_only_hidden_names_is_read_on(make_volume: Callable[..., InProcessVolume]) -> None:
    """With a filter below that passes one entry per listing request, a dropped entry must not end the listing."""
    names = [f"n{i}" for i in range(8)]

    def one_entry(cbd: CallbackData, objects: RelatedObjects, context: Any, flags: PostopFlags) -> Any:
        p = cbd.iopb.parameters
        assert isinstance(p, DirectoryControlParameters)
        p.entries = p.entries[:1]
        return PostopCallbackStatus.FINISHED_PROCESSING

    def pass_down(cbd: CallbackData, objects: RelatedObjects) -> Any:
        return PreopCallbackStatus.SUCCESS_WITH_CALLBACK

    trickle = Filter(
        "trickle", FilterRegistration((OperationRegistration(MajorFunction.DIRECTORY_CONTROL, pass_down, one_entry),))
    )
    # Hide the entry in the middle of the directory's own order (ext4 lists by hash): entries follow it.
    probe = make_volume({f"a/{n}": None for n in names} | {"x": None}, {"RealMapping": "q/r", "UserMapping": "x/y"})
    order = await probe.listdir("a")
    hidden = order[len(order) // 2]
    vol = make_volume(
        {f"a/{n}": None for n in names} | {"x/y": None},
        {"RealMapping": f"a/{hidden}", "UserMapping": "x/y"},
        extra=((trickle, "360000"),),
    )
    assert await vol.listdir("a") == [n for n in order if n != hidden]
    assert await vol.listdir("x") == ["y"]  # the real x/y is dropped (shadowed), and the graft comes last


async def test_files_made_changed_and_removed_through_the_graft_are_in_the_real_directory(
    make_volume: Callable[..., InProcessVolume],
) -> None:
    vol = make_volume(TREE)
    real = vol.directory / "a/b"
    await vol.write_file("x/y/new.txt", b"written through x/y\n")
    assert (real / "new.txt").read_bytes() == b"written through x/y\n"
    await vol.mkdir("x/y/made")
    await vol.rename("x/y/new.txt", "x/y/made/moved.txt")
    assert (real / "made/moved.txt").read_bytes() == b"written through x/y\n"
    await vol.rename("x/y/made/moved.txt", "out.txt")  # out of the graft
    assert (vol.directory / "out.txt").exists()
    await vol.unlink("x/y/f")
    await vol.rmdir("x/y/made")
    assert sorted(os.listdir(real)) == ["sub"]
    assert (vol.directory / "x").is_dir() and os.listdir(vol.directory / "x") == []  # nothing made at x on disk


async def test_the_graft_itself_is_made_removed_and_moved_by_its_user_name(
    make_volume: Callable[..., InProcessVolume],
) -> None:
    vol = make_volume({"a": None, "x": None})
    with pytest.raises(FileNotFoundError):
        await vol.lookup("x/y")
    assert await vol.listdir("x") == []
    await vol.mkdir("x/y")  # makes a/b
    assert (vol.directory / "a/b").is_dir()
    assert await vol.listdir("x") == ["y"]
    await vol.rename("x/y", "x/z")  # a/b moves to x/z: no graft any more, and nothing hidden
    assert sorted(os.listdir(vol.directory / "x")) == ["z"]
    assert await vol.listdir("x") == ["z"]
    await vol.rename("x/z", "x/y")  # back to a/b
    assert (vol.directory / "a/b").is_dir()
    await vol.rmdir("x/y")  # removes a/b
    assert os.listdir(vol.directory / "a") == []
    await vol.rmdir("a")
    with pytest.raises(FileNotFoundError):
        await vol.mkdir("x/y")  # its real parent is gone: as if x/y's parent were missing


async def test_the_hidden_name_and_the_graft_holder_answer_like_ext4(
    make_volume: Callable[..., InProcessVolume],
) -> None:
    vol = make_volume(TREE | {"elsewhere": None})
    with pytest.raises(PermissionError):
        await vol.mkdir("a/b")  # reserved for the graft
    with pytest.raises(PermissionError):
        await vol.write_file("a/b", b"")
    with pytest.raises(PermissionError):
        await vol.rename("elsewhere", "a/b")
    with pytest.raises(FileNotFoundError):
        await vol.rmdir("a/b")
    with pytest.raises(FileNotFoundError):
        await vol.rename("a/b", "a/c")
    with pytest.raises(OSError) as info:
        await vol.rmdir("x")
    assert info.value.errno == errno.ENOTEMPTY  # it holds the graft, though empty on disk
    with pytest.raises(OSError) as info:
        await vol.rename("x", "x2")
    assert info.value.errno == errno.EBUSY
    assert sorted(os.listdir(vol.directory / "a")) == ["b", "keep"]  # nothing changed
    await vol.rename("x/y", "elsewhere/b")  # the graft gone: x is an ordinary directory again
    await vol.rmdir("x")


async def test_real_and_user_places_in_one_directory(make_volume: Callable[..., InProcessVolume]) -> None:
    """The root's listing both hides the real name and shows the graft."""
    vol = make_volume({"real/f": b"at the root\n", "other": b"a file"}, {"RealMapping": "real", "UserMapping": "user"})
    assert sorted(await vol.listdir(".")) == ["other", "user"]
    assert await vol.read_file("user/f") == b"at the root\n"
    await vol.rename("user", "moved")  # real moves to moved: visible there, no graft
    assert sorted(await vol.listdir(".")) == ["moved", "other"]


class NameWatch:
    """A filter that records the names it gets for LOOKUP and opens of regular files."""

    def __init__(self, name: str):
        self.names: list[tuple[str, str]] = []
        self.filter = Filter(
            name,
            FilterRegistration(
                (
                    OperationRegistration(MajorFunction.LOOKUP, self.pre_lookup),
                    OperationRegistration(MajorFunction.CREATE, post=self.post_create),
                )
            ),
        )

    def pre_lookup(self, cbd: CallbackData, objects: RelatedObjects) -> PreopCallbackStatus:
        p = cbd.iopb.parameters
        assert isinstance(p, LookupParameters)
        self.names.append(("lookup", get_file_name_information(cbd, objects).name))
        return PreopCallbackStatus.SUCCESS_NO_CALLBACK

    def post_create(self, cbd: CallbackData, objects: RelatedObjects, context: Any, flags: PostopFlags) -> Any:
        p = cbd.iopb.parameters
        assert isinstance(p, CreateParameters)
        if cbd.io_status.status == NtStatus.SUCCESS and p.file_type is FileType.REGULAR:
            for name_format in (NameFormat.NORMALIZED, NameFormat.OPENED):
                self.names.append((name_format.name, get_file_name_information(cbd, objects, name_format).name))
        return PostopCallbackStatus.FINISHED_PROCESSING


async def test_filters_above_see_the_user_names_and_filters_below_the_real_ones(
    make_volume: Callable[..., InProcessVolume],
) -> None:
    above, below = NameWatch("above"), NameWatch("below")
    vol = make_volume(TREE, extra=((above.filter, "380000"), (below.filter, "360000")))
    assert await vol.read_file("x/y/sub/g") == b"deeper\n"
    await vol.write_file("x/y/sub/new", b"")
    v = str(vol.directory.absolute())
    g, new = f"{v}/x/y/sub/g", f"{v}/x/y/sub/new"
    assert set(above.names) == {
        ("lookup", f"{v}/x"),
        ("lookup", f"{v}/x/y"),
        ("lookup", f"{v}/x/y/sub"),
        ("lookup", g),
        ("NORMALIZED", g),
        ("OPENED", g),
        ("lookup", new),
        ("NORMALIZED", new),
        ("OPENED", new),
    }
    # Below, the same requests with the real names, and namechanger's own LOOKUPs of a (it opens a/ to redirect y)
    own = ("lookup", f"{v}/a")
    assert own in below.names
    assert [n for n in below.names if n != own] == [(k, n.replace(f"{v}/x/y", f"{v}/a/b")) for k, n in above.names]


@pytest.mark.parametrize(
    ("real", "user"),
    [("a/b", "a/b"), ("a", "a/b"), ("x/y/z", "x"), ("/", "x/y"), ("a/b", ""), ("a/../b", "x/y")],
)
async def test_mappings_that_cannot_be_grafted_decline_to_attach(
    make_volume: Callable[..., InProcessVolume], real: str, user: str
) -> None:
    with pytest.raises(StackError) as info:
        make_volume({}, {"RealMapping": real, "UserMapping": user})
    assert info.value.status == NtStatus.FLT_DO_NOT_ATTACH


async def test_windows_style_paths_and_the_inf_defaults(make_volume: Callable[..., InProcessVolume]) -> None:
    vol = make_volume({"A/B/f": b"from A\\B\n", "X": None}, {"RealMapping": "\\A\\B", "UserMapping": "\\X\\Y"})
    assert await vol.read_file("X/Y/f") == b"from A\\B\n"
    default = InProcessVolume(vol.directory, ["namechanger"])
    try:
        instance = default.stack.instances[0]
        assert instance.altitude == Decimal("370120")
        graft = namechanger.graft_of(instance)
        assert graft is not None and (str(graft.real), str(graft.user)) == ("/a/b", "/x/y")
    finally:
        default.close()
