"""change: track which files were modified while the kernel holds them, and answer a getxattr with the state.

A port of Windows' change minifilter sample (``filesys/miniFilter/change``).

Design and operation
--------------------

Each file the filter sees modified gets a file context with ``dirty`` set
(the Windows sample's ``Dirty``). It is set in the post-operation of a request
that succeeded and changed the file's data:

* WRITE (a ``write(2)``, or the page cache writing back an ``mmap``);
* SET_INFORMATION with a new size (END_OF_FILE: ``truncate(2)``,
  ``ftruncate(2)``, ``truncate -s``; also a size change combined with other
  attributes);
* CREATE that truncates (``O_TRUNC``: dispositions OVERWRITE and
  OVERWRITE_IF, e.g. a shell's ``>``) or makes a new regular file (CREATE,
  OPEN_IF: ``touch new``, ``cp``): a new file is a change.

Opening, reading, ``stat``, ``chmod``, ``touch`` of an existing file, renames
and links leave it as it was: a file only read is clean.

The state lives as long as the file context: until the kernel forgets the
inode (after the last close, when it drops the inode from its cache: memory
pressure, ``echo 2 > /proc/sys/vm/drop_caches``, unmount) or the instance
detaches. A file the kernel still holds stays dirty across closes and
reopens; once forgotten it is clean again (the Windows sample's file
context lives as long as the file control block, the same rule there).

The state is exposed as an extended attribute: pre-QUERY_EA of a
``getxattr(2)`` of ``user.fltfuse.change`` is completed by the filter
(nothing below sees it) with the value ``dirty`` or ``clean``; a file the
filter has no context for is ``clean``. Any other xattr request passes
through unchanged, ``listxattr(2)`` does not list the name (``getfattr -d``
does not show it; ``getfattr -n user.fltfuse.change`` does), and a real
xattr of that name in the backing file system is hidden from ``getxattr``
while the filter is attached. This keeps the report on the file it is about,
readable with ordinary tools and with no log to parse.

Differences from the Windows sample: no transactions (no ``TxDirty``, no KTM
notifications), and no FSCTLs that write (Linux has no offload writes or
set-zero-data through FUSE).
"""

from __future__ import annotations

from typing import Any

from filters._contexts import find_or_create_context
from fltfuse import (
    CallbackData,
    Context,
    ContextRegistration,
    ContextType,
    CreateDisposition,
    CreateParameters,
    EaMinor,
    FileType,
    FilterRegistration,
    FilterUnloadFlags,
    MajorFunction,
    NtStatus,
    OperationRegistration,
    PostopCallbackStatus,
    PostopFlags,
    PreopCallbackStatus,
    QueryEaParameters,
    RelatedObjects,
    SetAttributesParameters,
    get_context,
    release_context,
)

STATE_ATTRIBUTE = b"user.fltfuse.change"
DIRTY = b"dirty"
CLEAN = b"clean"

_MODIFYING_CREATE = frozenset(
    {
        CreateDisposition.CREATE,
        CreateDisposition.OPEN_IF,
        CreateDisposition.OVERWRITE,
        CreateDisposition.OVERWRITE_IF,
    }
)


def _mark_dirty(objects: RelatedObjects) -> None:
    """Find or create the file's context and set ``dirty``."""
    context = find_or_create_context(objects, ContextType.FILE, _clean)
    context.dirty = True
    release_context(context)


def _clean(context: Context) -> None:
    context.dirty = False


def post_modifying(
    cbd: CallbackData, objects: RelatedObjects, context: Any, flags: PostopFlags
) -> PostopCallbackStatus:
    """After WRITE, a size change, or an open that truncated or made a file: the file is dirty, if it succeeded."""
    if flags & PostopFlags.DRAINING or cbd.io_status.status != NtStatus.SUCCESS:
        return PostopCallbackStatus.FINISHED_PROCESSING
    p = cbd.iopb.parameters
    if not isinstance(p, CreateParameters) or (p.disposition in _MODIFYING_CREATE and p.file_type is FileType.REGULAR):
        _mark_dirty(objects)  # a WRITE, a size change (the pre asked for no other post), or a truncating create
    return PostopCallbackStatus.FINISHED_PROCESSING


def pre_set_information(cbd: CallbackData, objects: RelatedObjects) -> PreopCallbackStatus:
    """Only a size change can make a file dirty: other SET_INFORMATION requests need no post."""
    p = cbd.iopb.parameters
    if isinstance(p, SetAttributesParameters) and p.size is not None:
        return PreopCallbackStatus.SUCCESS_WITH_CALLBACK
    return PreopCallbackStatus.SUCCESS_NO_CALLBACK


def pre_query_ea(cbd: CallbackData, objects: RelatedObjects) -> PreopCallbackStatus:
    """Answer ``getxattr(user.fltfuse.change)`` with the file's state; pass everything else down."""
    p = cbd.iopb.parameters
    if not isinstance(p, QueryEaParameters) or p.minor is not EaMinor.GET or p.name != STATE_ATTRIBUTE:
        return PreopCallbackStatus.SUCCESS_NO_CALLBACK
    context = get_context(objects, ContextType.FILE)
    p.value = DIRTY if context is not None and context.dirty else CLEAN
    if context is not None:
        release_context(context)
    cbd.io_status.status = NtStatus.SUCCESS
    cbd.io_status.information = len(p.value)
    return PreopCallbackStatus.COMPLETE


def instance_query_teardown(objects: RelatedObjects, flags: int) -> NtStatus:
    return NtStatus.SUCCESS  # fltmc detach: what the instance knew is forgotten with its contexts


def filter_unload(flags: FilterUnloadFlags) -> NtStatus:
    return NtStatus.SUCCESS


REGISTRATION = FilterRegistration(
    operations=(
        OperationRegistration(MajorFunction.CREATE, post=post_modifying),
        OperationRegistration(MajorFunction.WRITE, post=post_modifying),
        OperationRegistration(MajorFunction.SET_INFORMATION, pre_set_information, post_modifying),
        OperationRegistration(MajorFunction.QUERY_EA, pre_query_ea),
    ),
    contexts=(ContextRegistration(ContextType.FILE),),
    instance_query_teardown=instance_query_teardown,
    filter_unload=filter_unload,
)
