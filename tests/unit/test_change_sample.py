"""The change sample in-process: a file is dirty after a write, a size change or a truncating or creating open,
clean after read-only use, and keeps its state while the kernel holds the inode (its file context)."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from fltfuse import (
    CallbackData,
    EaMinor,
    FileInformationClass,
    FileObject,
    InstanceTeardownFlags,
    MajorFunction,
    Parameters,
    QueryEaParameters,
    Requestor,
    SetAttributesParameters,
    SetEaParameters,
    _loader,
    errno_from_status,
)
from fltfuse.testing import InProcessVolume

from .test_ctx_sample import forget

STATE = b"user.fltfuse.change"


@pytest.fixture
def volume(tmp_path: Path) -> Iterator[Callable[..., InProcessVolume]]:
    """``volume(files)``: a change volume over a fresh directory holding ``files``; closed after the test."""
    made: list[InProcessVolume] = []

    def make(files: dict[str, bytes] | None = None) -> InProcessVolume:
        directory = tmp_path / f"vol-{len(made)}"
        directory.mkdir()
        for name, data in (files or {}).items():
            (directory / name).write_bytes(data)
        vol = InProcessVolume(directory, ["change"])
        made.append(vol)
        return vol

    yield make
    for vol in made:
        if vol.stack.instances:
            vol.close()


async def send(vol: InProcessVolume, path: str, params: Parameters) -> Parameters:
    """One request on ``path`` (no handle), as the kernel sends getxattr, setxattr or truncate by path;
    raises OSError with the errno the caller would get."""
    cbd = CallbackData(FileObject(await vol.lookup(path)), params, Requestor(os.getpid(), 0, 0, 0o022))
    await vol.stack.dispatch(cbd)
    if cbd.io_status.status:
        code = errno_from_status(cbd.io_status.status)
        raise OSError(code, os.strerror(code), path)
    return params


async def state(vol: InProcessVolume, path: str) -> bytes | None:
    """``getxattr(path, "user.fltfuse.change")``."""
    params = await send(vol, path, QueryEaParameters(EaMinor.GET, STATE))
    assert isinstance(params, QueryEaParameters)
    return params.value


async def truncate(vol: InProcessVolume, path: str, size: int) -> None:
    await send(vol, path, SetAttributesParameters(FileInformationClass.END_OF_FILE, size=size))


def test_the_inf_and_the_registration() -> None:
    loaded = _loader.load_filter(_loader.find_inf("change"))
    instance = _loader.default_instance(loaded.filter, loaded.inf)
    assert instance is not None and instance.name == "Change Instance" and instance.altitude == 370165
    assert set(instance.filter.operations) == {
        MajorFunction.CREATE,
        MajorFunction.WRITE,
        MajorFunction.SET_INFORMATION,
        MajorFunction.QUERY_EA,
    }
    assert [c.type.name for c in instance.filter.registration.contexts] == ["FILE"]


async def test_read_only_use_leaves_a_file_clean(volume: Callable[..., InProcessVolume]) -> None:
    vol = volume({"f": b"content"})
    assert await state(vol, "f") == b"clean"
    assert await vol.read_file("f") == b"content"
    handle = await vol.open("f", os.O_RDWR)  # opened for writing, but not written
    assert await vol.read(handle, 0, 3) == b"con"
    await vol.close_handle(handle)
    await send(vol, "f", SetAttributesParameters(FileInformationClass.BASIC, mode=0o600))  # chmod: no content change
    await vol.rename("f", "g")
    assert await state(vol, "g") == b"clean"


@pytest.mark.parametrize("how", ["write", "truncate", "O_TRUNC", "new file"])
async def test_a_modification_makes_a_file_dirty_until_the_kernel_forgets_it(
    volume: Callable[..., InProcessVolume], how: str
) -> None:
    vol = volume({} if how == "new file" else {"f": b"content"})
    if how == "write":
        handle = await vol.open("f", os.O_WRONLY)
        assert await vol.write(handle, 7, b"+") == 1
        await vol.close_handle(handle)
    elif how == "truncate":
        await truncate(vol, "f", 3)
    elif how == "O_TRUNC":
        await vol.close_handle(await vol.open("f", os.O_WRONLY | os.O_TRUNC))  # no WRITE at all
    else:
        await vol.close_handle(await vol.open("f", os.O_WRONLY | os.O_CREAT | os.O_EXCL))
    assert await state(vol, "f") == b"dirty"
    assert await vol.read_file("f") in (b"content+", b"con", b"")  # a reopen, read only: still dirty
    await vol.rename("f", "g")  # the state is the file's, not the name's
    assert await state(vol, "g") == b"dirty"
    await forget(vol, "g")
    assert await state(vol, "g") == b"clean"  # a new file context: the old one went with the inode


async def test_failed_modifications_leave_a_file_clean_and_keep_their_errno(
    volume: Callable[..., InProcessVolume],
) -> None:
    vol = volume({"f": b"content"})
    handle = await vol.open("f", os.O_RDONLY)
    with pytest.raises(OSError) as info:
        await vol.write(handle, 0, b"x")  # a read-only descriptor: ext4 says EBADF
    assert info.value.errno == errno.EBADF
    await vol.close_handle(handle)
    with pytest.raises(OSError) as info:
        await truncate(vol, "f", -1)
    assert info.value.errno == errno.EINVAL
    with pytest.raises(FileExistsError):
        await vol.open("f", os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    assert await state(vol, "f") == b"clean"


async def test_other_extended_attributes_pass_through_unchanged(volume: Callable[..., InProcessVolume]) -> None:
    vol = volume({"f": b"x"})
    with pytest.raises(OSError) as info:
        await send(vol, "f", QueryEaParameters(EaMinor.GET, b"user.other"))
    assert info.value.errno == errno.ENODATA
    await send(vol, "f", SetEaParameters(EaMinor.SET, b"user.other", b"value"))
    other = await send(vol, "f", QueryEaParameters(EaMinor.GET, b"user.other"))
    assert isinstance(other, QueryEaParameters) and other.value == b"value"
    listed = await send(vol, "f", QueryEaParameters(EaMinor.LIST))
    assert isinstance(listed, QueryEaParameters) and listed.names == [b"user.other"]  # the state is not listed
    assert os.getxattr(vol.directory / "f", "user.other") == b"value"


async def test_detach_forgets_the_state_and_getxattr_reaches_the_file_system(
    volume: Callable[..., InProcessVolume],
) -> None:
    vol = volume({"f": b"x"})
    await truncate(vol, "f", 0)
    assert await state(vol, "f") == b"dirty"
    (instance,) = vol.stack.instances
    await vol.stack.detach(instance, InstanceTeardownFlags.MANUAL)
    with pytest.raises(OSError) as info:
        await state(vol, "f")
    assert info.value.errno == errno.ENODATA
