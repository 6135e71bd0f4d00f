"""The simrep sample in-process: names in OldMapping resolve in NewMapping, and OldMapping's own listing stays."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from decimal import Decimal
from pathlib import Path

import pytest

import filters.simrep as simrep
from fltfuse import MajorFunction, NtStatus
from fltfuse._stack import StackError
from fltfuse.testing import InProcessVolume

MAPPING = {"OldMapping": "x/y", "NewMapping": "a/b"}
TREE: dict[str, bytes | None] = {
    "x/y/f": b"old f\n",
    "x/y/only-old": b"only in x/y\n",
    "x/yy/f": b"x/yy is another directory\n",
    "a/b/f": b"new f\n",
    "a/b/sub/g": b"new g\n",
}


@pytest.fixture
def make_volume(tmp_path: Path) -> Iterator[Callable[..., InProcessVolume]]:
    """Volumes over tmp_path/vol-N holding ``files`` (path -> bytes, or None for a directory), with simrep."""
    made: list[InProcessVolume] = []

    def make(files: Mapping[str, bytes | None] = TREE, **parameters: str) -> InProcessVolume:
        directory = tmp_path / f"vol-{len(made)}"
        directory.mkdir()
        for name, data in files.items():
            path = directory / name
            if data is None:
                path.mkdir(parents=True, exist_ok=True)
            else:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(data)
        volume = InProcessVolume(directory, ["simrep"], parameters={"simrep": MAPPING | parameters})
        made.append(volume)
        return volume

    yield make
    for volume in made:
        volume.close()


async def test_names_in_old_resolve_in_new_while_old_lists_its_own(make_volume: Callable[..., InProcessVolume]) -> None:
    vol = make_volume()
    assert sorted(await vol.listdir("x/y")) == ["f", "only-old"]  # x/y itself is not redirected
    assert await vol.read_file("x/y/f") == b"new f\n"
    assert (await vol.stat("x/y/f")).st_ino == os.stat(vol.directory / "a/b/f").st_ino
    assert (await vol.stat("x/y")).st_ino == os.stat(vol.directory / "x/y").st_ino
    with pytest.raises(FileNotFoundError):
        await vol.read_file("x/y/only-old")  # listed in x/y, but looked up in a/b
    assert await vol.listdir("x/y/sub") == ["g"]  # a directory reached through the redirect is a/b's
    assert await vol.read_file("x/y/sub/g") == b"new g\n"
    assert await vol.read_file("x/yy/f") == b"x/yy is another directory\n"  # a longer name is not under x/y
    assert await vol.lookup("x/y/..") == await vol.lookup("x")  # .. is not redirected


async def test_names_made_and_removed_in_old_are_made_and_removed_in_new(
    make_volume: Callable[..., InProcessVolume],
) -> None:
    vol = make_volume()
    new = vol.directory / "a/b"
    await vol.write_file("x/y/made.txt", b"made through x/y\n")
    await vol.mkdir("x/y/dir")
    assert (new / "made.txt").read_bytes() == b"made through x/y\n"
    assert (new / "dir").is_dir()
    assert sorted(await vol.listdir("x/y")) == ["f", "only-old"]  # x/y's own listing did not change
    await vol.unlink("x/y/f")
    await vol.rmdir("x/y/dir")
    assert sorted(os.listdir(new)) == ["made.txt", "sub"]
    assert (vol.directory / "x/y/f").read_bytes() == b"old f\n"  # x/y's own f is untouched


async def test_rename_targets_are_redirected_only_with_remap_renames_and_links(
    make_volume: Callable[..., InProcessVolume],
) -> None:
    vol = make_volume()
    (vol.directory / "outside").write_bytes(b"moved in\n")
    await vol.rename("outside", "x/y/moved")  # RemapRenamesAndLinks 0: the target is x/y's own
    assert (vol.directory / "x/y/moved").read_bytes() == b"moved in\n"
    with pytest.raises(FileNotFoundError):
        await vol.lookup("x/y/moved")  # where later lookups do not find it, as on Windows
    await vol.rename("x/y/f", "x/y/g")  # the source is a/b's f; the target x/y's own
    assert not (vol.directory / "a/b/f").exists()
    assert (vol.directory / "x/y/g").read_bytes() == b"new f\n"

    remapped = make_volume(RemapRenamesAndLinks="1")
    (remapped.directory / "outside").write_bytes(b"moved in\n")
    await remapped.rename("outside", "x/y/moved")
    assert (remapped.directory / "a/b/moved").read_bytes() == b"moved in\n"
    assert await remapped.read_file("x/y/moved") == b"moved in\n"
    await remapped.rename("x/y/f", "x/y/g")  # both ends in a/b
    assert sorted(os.listdir(remapped.directory / "a/b")) == ["g", "moved", "sub"]


async def test_a_missing_new_mapping_is_a_dangling_redirect(make_volume: Callable[..., InProcessVolume]) -> None:
    vol = make_volume({"x/y/f": b"old f\n"})
    assert await vol.listdir("x/y") == ["f"]
    with pytest.raises(FileNotFoundError):
        await vol.read_file("x/y/f")
    with pytest.raises(FileNotFoundError):
        await vol.write_file("x/y/new", b"")
    assert os.listdir(vol.directory / "x/y") == ["f"]
    (vol.directory / "a").mkdir()
    (vol.directory / "a/b").write_bytes(b"a file, not a directory\n")
    with pytest.raises(NotADirectoryError):
        await vol.read_file("x/y/f")


@pytest.mark.parametrize(
    "parameters",
    [
        {"OldMapping": "x/y", "NewMapping": "x/y"},
        {"OldMapping": "x", "NewMapping": "x/y/z"},
        {"OldMapping": "/", "NewMapping": "a"},
        {"OldMapping": "x/../a", "NewMapping": "b"},
        {"RemapRenamesAndLinks": "2"},
    ],
)
async def test_mappings_that_cannot_work_decline_to_attach(
    make_volume: Callable[..., InProcessVolume], parameters: dict[str, str]
) -> None:
    with pytest.raises(StackError) as info:
        make_volume({}, **parameters)
    assert info.value.status == NtStatus.FLT_DO_NOT_ATTACH


async def test_the_inf_defaults_are_the_windows_samples(tmp_path: Path) -> None:
    async with InProcessVolume(tmp_path, ["simrep"]) as vol:
        instance = vol.stack.instances[0]
        assert instance.altitude == Decimal("371100")
        redirect = simrep.redirect_of(instance)
        assert redirect is not None
        assert (str(redirect.old), str(redirect.new), redirect.remap_renames_and_links) == ("/x/y", "/a/b", False)
        # A listing of x/y hands the kernel x/y's own inodes for its names: it may not cache them (entry
        # timeout 0), or a later open would use them instead of asking (tested on a mount).
        assert vol.stack.bypasses_kernel_cache(MajorFunction.LOOKUP)
