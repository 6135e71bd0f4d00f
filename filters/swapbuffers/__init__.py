"""swapbuffers: swap the filter's own buffers into READ, WRITE and DIRECTORY_CONTROL; the data stays unchanged.

A port of Windows' swapBuffers minifilter sample (``filesys/miniFilter/swapBuffers``):
the template of every filter that transforms data (encryption, compression).
It shows a pre-operation that changes what goes down (``set_dirty``), a
post-operation that sees the caller's original parameters and copies the
result back into them, and a completion context that carries the swapped
buffer from the pre to the post. Nothing in the data changes: a volume with
it attached behaves exactly as one without it.

Design and operation
--------------------

Parameters (INF ``Parameters`` key, or ``--param swapbuffers.KEY=VALUE``):

* ``SectorSize`` (REG_DWORD, default 512): the unit a READ is aligned to, a
  power of two from 512 to 65536. Anything else makes instance setup refuse
  (``InstanceSetupRefused``) with a message naming the filter and the value:
  the attach fails with it, and so does a mount.

Each instance keeps an instance context (Windows keeps the sector size in a
volume context) holding its sector size and how many swaps it made per major
function (:func:`state_of`); its teardown logs the counts.

* **Pre-READ** widens the read to whole sectors: the offset rounded down, the
  end rounded up (``set_dirty``), and returns SUCCESS_WITH_CALLBACK with a
  :class:`ReadSwap` completion context recording the caller's range and the
  swapped one. The file system fills a buffer of the swapped range: the
  swapped buffer. An exception, as on Windows, where non-cached I/O must be
  sector-aligned already: a read of a handle opened with ``O_DIRECT`` whose
  offset is not sector-aligned keeps its range, so that the file system
  refuses it (``EINVAL``) as it would without the filter, instead of the
  filter making it succeed.
* **Post-READ** sees the caller's parameters (the walk copies the swapped
  buffer into its copy of them) and replaces ``data`` with a new object: the
  caller's slice of the swapped buffer. Slicing gives exactly what a read of
  the caller's range returns: shorter at the end of the file, empty past it.
  ``io_status.information`` is set to the slice's length. A failed read is
  left as it is.
* **Pre-WRITE** copies the caller's data into a new ``bytearray`` and passes
  that down (``set_dirty``); the completion context (:class:`WriteSwap`)
  holds it until the post. **Post-WRITE** checks that the count written is
  still a count of the caller's data (at most its length: the swapped buffer
  has the caller's length, so only a filter below changing it could break
  that; the write then fails with ``STATUS_IO_DEVICE_ERROR``) and drops the
  buffer.
* **DIRECTORY_CONTROL**: the pre asks for the post; the post replaces
  ``entries`` with a new list of copies of the entries (same names,
  attributes and next offsets): a swapped listing the caller cannot tell
  from the one the file system made.
* **Draining** (the instance detaches while a request is between its pre
  and its post): the filter manager calls the post at once, with
  ``PostopFlags.DRAINING``, on the parameters in flight below it, and will
  not call it again; what the layers below return then goes to the caller
  unchanged. For a READ that is the swapped range, not the caller's, so the
  post must still fix it: if the data has come back (a filter below is
  holding the request in its post) it cuts the caller's slice into the
  parameters in flight; if it has not (the request is still below), the
  data can no longer be cut when it arrives, and the post fails the read
  with ``STATUS_CANCELLED`` (``EINTR``: asked again, the read goes through
  the stack without this instance). A WRITE and a listing need nothing:
  what goes down and what comes back are the caller's data.

Any instance may be detached (``fltmc detach``) and the filter unloaded
(``fltmc unload``) at any time.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from fltfuse import (
    CallbackData,
    ContextRegistration,
    ContextType,
    DirectoryControlParameters,
    DirectoryEntry,
    DirectoryMinor,
    FilterRegistration,
    FilterUnloadFlags,
    InstanceSetupFlags,
    InstanceSetupRefused,
    InstanceTeardownFlags,
    MajorFunction,
    NtStatus,
    OperationRegistration,
    PostopCallbackStatus,
    PostopFlags,
    PreopCallbackStatus,
    ReadParameters,
    RelatedObjects,
    WriteParameters,
    allocate_context,
    get_context,
    release_context,
    set_context,
)

log = logging.getLogger("fltfuse.filters.swapbuffers")

SECTOR_SIZE_PARAMETER = "SectorSize"
DEFAULT_SECTOR_SIZE = 512
MIN_SECTOR_SIZE = 512
MAX_SECTOR_SIZE = 65536
SWAPPED = (MajorFunction.READ, MajorFunction.WRITE, MajorFunction.DIRECTORY_CONTROL)

_WITH_CALLBACK = PreopCallbackStatus.SUCCESS_WITH_CALLBACK
_FINISHED = PostopCallbackStatus.FINISHED_PROCESSING


def sector_size(parameters: Mapping[str, Any]) -> int:
    """The ``SectorSize`` parameter, checked; ValueError naming the value if it is not one."""
    value = parameters.get(SECTOR_SIZE_PARAMETER, DEFAULT_SECTOR_SIZE)
    try:
        size = int(value, 0) if isinstance(value, str) else value
    except ValueError:
        size = None
    if type(size) is not int or not MIN_SECTOR_SIZE <= size <= MAX_SECTOR_SIZE or size & (size - 1):
        raise ValueError(
            f"{SECTOR_SIZE_PARAMETER} {value!r} is not a power of two from {MIN_SECTOR_SIZE} to {MAX_SECTOR_SIZE}"
        )
    return size


@dataclass
class InstanceState:
    """What an instance keeps in its instance context: its sector size and its swaps per major function."""

    sector_size: int
    swaps: dict[MajorFunction, int] = field(default_factory=lambda: dict.fromkeys(SWAPPED, 0))


@dataclass(frozen=True, slots=True)
class ReadSwap:
    """Completion context of a READ: the caller's range and the swapped (sector-aligned) one."""

    offset: int
    length: int
    swapped_offset: int
    swapped_length: int
    state: InstanceState


@dataclass(frozen=True, slots=True)
class WriteSwap:
    """Completion context of a WRITE: the swapped buffer that went down in place of the caller's."""

    buffer: bytearray
    state: InstanceState


def state_of(objects: RelatedObjects) -> InstanceState | None:
    """The instance's state, from its instance context (None if it has none: not attached)."""
    context = get_context(objects, ContextType.INSTANCE)
    if context is None:
        return None
    state: InstanceState = context.state  # type: ignore[attr-defined]
    release_context(context)
    return state


def _state(objects: RelatedObjects) -> InstanceState:
    state = state_of(objects)
    assert state is not None, "instance setup sets the instance context before the instance sees a request"
    return state


def _failed(cbd: CallbackData) -> bool:
    return cbd.io_status.status >= 0x80000000  # not NT_SUCCESS


# -- READ -------------------------------------------------------------------------------------------


def pre_read(cbd: CallbackData, objects: RelatedObjects) -> tuple[PreopCallbackStatus, ReadSwap]:
    """Read whole sectors instead of the caller's range; the post cuts the caller's slice out of them."""
    p = cbd.iopb.parameters
    assert isinstance(p, ReadParameters)
    state = _state(objects)
    sector = state.sector_size
    offset, length = p.offset, p.length
    start = offset - offset % sector
    end = -(-(offset + length) // sector) * sector
    if cbd.iopb.target_file_object.flags & os.O_DIRECT:
        start, end = offset, offset + length  # non-cached I/O is the caller's to align, the file system's to refuse
    if (start, end) != (offset, offset + length):
        p.offset, p.length = start, end - start
        cbd.set_dirty()
    return _WITH_CALLBACK, ReadSwap(offset, length, start, end - start, state)


def post_read(cbd: CallbackData, objects: RelatedObjects, swap: ReadSwap, flags: PostopFlags) -> PostopCallbackStatus:
    """Replace the data with the caller's slice of the swapped buffer (a new object); see the module's draining."""
    if _failed(cbd):
        return _FINISHED
    p = cbd.iopb.parameters  # the caller's range; while draining, the swapped parameters in flight below
    assert isinstance(p, ReadParameters)
    swapped = p.data
    if swapped is None:
        if flags & PostopFlags.DRAINING:  # still below: its data will come back too late to be cut
            cbd.io_status.status = NtStatus.CANCELLED
            cbd.io_status.information = 0
            return _FINISHED
        swapped = b""  # a filter below completed the read without data: nothing was read
    start = swap.offset - swap.swapped_offset
    p.data = bytes(memoryview(swapped)[start : start + swap.length])
    cbd.io_status.information = len(p.data)
    swap.state.swaps[MajorFunction.READ] += 1
    return _FINISHED


# -- WRITE ------------------------------------------------------------------------------------------


def pre_write(cbd: CallbackData, objects: RelatedObjects) -> tuple[PreopCallbackStatus, WriteSwap]:
    """Send a copy of the caller's data down instead of the caller's buffer."""
    p = cbd.iopb.parameters
    assert isinstance(p, WriteParameters)
    swapped = bytearray(p.data)
    p.data = swapped
    cbd.set_dirty()
    state = _state(objects)
    state.swaps[MajorFunction.WRITE] += 1
    return _WITH_CALLBACK, WriteSwap(swapped, state)


def post_write(cbd: CallbackData, objects: RelatedObjects, swap: WriteSwap, flags: PostopFlags) -> PostopCallbackStatus:
    """The count written must be one of the caller's bytes; the swapped buffer goes with the completion context."""
    if flags & PostopFlags.DRAINING or _failed(cbd):
        return _FINISHED
    p = cbd.iopb.parameters
    assert isinstance(p, WriteParameters)
    if cbd.io_status.information > len(p.data):
        log.error(
            "instance %s: %d bytes written of a swapped buffer of %d (the caller gave %d): failing the write",
            objects.instance.name,
            cbd.io_status.information,
            len(swap.buffer),
            len(p.data),
        )
        cbd.io_status.status = NtStatus.IO_DEVICE_ERROR
        cbd.io_status.information = 0
    return _FINISHED


# -- DIRECTORY_CONTROL ------------------------------------------------------------------------------


def pre_directory_control(
    cbd: CallbackData, objects: RelatedObjects
) -> PreopCallbackStatus | tuple[PreopCallbackStatus, InstanceState]:
    """A listing's entries are made by the file system: the post swaps them."""
    p = cbd.iopb.parameters
    assert isinstance(p, DirectoryControlParameters)
    if p.minor is not DirectoryMinor.QUERY_DIRECTORY:
        return PreopCallbackStatus.SUCCESS_NO_CALLBACK
    return _WITH_CALLBACK, _state(objects)


def post_directory_control(
    cbd: CallbackData, objects: RelatedObjects, state: InstanceState, flags: PostopFlags
) -> PostopCallbackStatus:
    """Replace the entries with a new list of copies of them."""
    if flags & PostopFlags.DRAINING or _failed(cbd):
        return _FINISHED  # what comes back from below is the caller's listing as it is
    p = cbd.iopb.parameters
    assert isinstance(p, DirectoryControlParameters)
    p.entries = [DirectoryEntry(e.name, copy.copy(e.attributes), e.next_offset) for e in p.entries]
    state.swaps[MajorFunction.DIRECTORY_CONTROL] += 1
    return _FINISHED


# -- instance and filter callbacks ------------------------------------------------------------------


def instance_setup(
    objects: RelatedObjects, flags: InstanceSetupFlags, volume_device_type: str, volume_filesystem_type: str
) -> NtStatus:
    """Keep the sector size in the instance context; refuse to attach with a bad ``SectorSize``."""
    try:
        size = sector_size(objects.filter.parameters)
    except ValueError as exc:
        raise InstanceSetupRefused(str(exc)) from None  # the attach fails with "swapbuffers (instance ...): ..."
    context = allocate_context(objects, ContextType.INSTANCE)
    context.state = InstanceState(size)  # type: ignore[attr-defined]
    set_context(objects, context)
    release_context(context)  # the instance keeps its own reference
    log.info("instance %s swaps buffers; reads are aligned to %d bytes", objects.instance.name, size)
    return NtStatus.SUCCESS


def instance_query_teardown(objects: RelatedObjects, flags: int) -> NtStatus:
    return NtStatus.SUCCESS  # fltmc detach may take any instance away


def instance_teardown_complete(objects: RelatedObjects, reason: InstanceTeardownFlags) -> None:
    """Log how many buffers the instance swapped."""
    state = state_of(objects)
    if state is not None:
        swaps = state.swaps
        log.info(
            "instance %s swapped %d reads, %d writes, %d listings",
            objects.instance.name,
            swaps[MajorFunction.READ],
            swaps[MajorFunction.WRITE],
            swaps[MajorFunction.DIRECTORY_CONTROL],
        )


def filter_unload(flags: FilterUnloadFlags) -> NtStatus:
    return NtStatus.SUCCESS


REGISTRATION = FilterRegistration(
    operations=(
        OperationRegistration(MajorFunction.READ, pre_read, post_read),
        OperationRegistration(MajorFunction.WRITE, pre_write, post_write),
        OperationRegistration(MajorFunction.DIRECTORY_CONTROL, pre_directory_control, post_directory_control),
    ),
    contexts=(ContextRegistration(ContextType.INSTANCE),),
    filter_unload=filter_unload,
    instance_setup=instance_setup,
    instance_query_teardown=instance_query_teardown,
    instance_teardown_complete=instance_teardown_complete,
)
