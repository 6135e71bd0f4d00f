"""ctx: instance, file, stream and stream handle contexts, each counting what it saw and reporting at its cleanup.

A port of Windows' ctx minifilter sample (``filesys/miniFilter/ctx``).

Design and operation
--------------------

Four context types, as in the Windows sample; each is a
:class:`~fltfuse.Context` with the counters and name below as attributes:

* **instance context**, set at instance setup: the volume's name (its mount
  point) and totals for the instance (``opens``, ``reads``, ``writes``,
  ``bytes_read``, ``bytes_written``, ``cleanups``, ``closes``), how many
  contexts of each type it allocated and how many of those have been cleaned
  up, and ``streams``, the stream contexts now alive by inode (no reference:
  a stream context leaves it in its cleanup).
* **stream context** (the inode; Linux files have one data stream): the
  file's normalized name (a name query, ``get_file_name_information``) and
  the same counters for the file across all its handles.
* **file context** (also the inode: the Windows sample keeps both kinds, and
  so does this port): the name the file had when first opened, and
  ``handles``, how many handles are open now (0 again when it is cleaned up).
* **stream handle context** (the FUSE handle): the name the caller opened it
  by (the OPENED format) and the handle's own counters.

Post-CREATE of anything opened with a handle finds or creates (KEEP_IF_EXISTS:
``filters._contexts.find_or_create_context``) the stream and file contexts and sets a new
stream handle context; it refreshes the stream context's name, as the
Windows sample does. Post-READ and post-WRITE count requests and bytes,
pre-CLEANUP (each ``close(2)``) and pre-CLOSE (the handle is released)
count those. A rename changes the names of the renamed file and of every
file below a renamed directory: the pre-operation takes the source (and for
RENAME_EXCHANGE the destination) name, and the post-operation queries the
name again for each live stream context that had one of those names or a
name below them (the Windows sample replaces the name of the renamed file's
stream context in post-SET_INFORMATION; here the request names a directory
entry, not the file, hence the instance's ``streams`` index).

Every context other than the instance context holds a reference to the
instance context, given back in its cleanup: the instance context is cleaned
up last, and its report can say that every context the instance allocated
was cleaned up. The contexts' lifetimes are the filter manager's: stream and
file contexts go when the kernel forgets the inode (``echo 2 >
/proc/sys/vm/drop_caches``, or the unmount), a stream handle context at the
handle's CLOSE, the instance context after teardown complete (detach,
unload, unmount).

What it knows is reported at each cleanup, as one log line (logger
``fltfuse.filters.ctx``, level INFO, in the daemon's log) of the form
``ctx: STREAM context cleanup {json}``: ``serial`` (unique per context),
``name``, the counters, and ``inode`` or ``handle``; the instance's line has
``volume``, ``totals``, ``allocated`` and ``cleaned``.

Differences from the Windows sample: READ and WRITE are registered without
SKIP_PAGING_IO, because here every READ and WRITE on a handle that uses the
page cache is paging I/O (``OperationFlags``): the counts are the requests
that reach the file system, not the ``read(2)`` calls the kernel answers
from its page cache. A handle opened before the instance attached has no
contexts; its I/O counts in the instance totals only.
"""

from __future__ import annotations

import itertools
import json
import logging
from collections import Counter
from collections.abc import Callable
from typing import Any

from filters._contexts import find_or_create_context
from fltfuse import (
    CallbackData,
    Context,
    ContextRegistration,
    ContextType,
    CreateParameters,
    FileNameError,
    FileObject,
    FilterRegistration,
    FilterUnloadFlags,
    InstanceSetupFlags,
    MajorFunction,
    NameFormat,
    NtStatus,
    OperationRegistration,
    PostopCallbackStatus,
    PostopFlags,
    PreopCallbackStatus,
    ReadParameters,
    RelatedObjects,
    RenameParameters,
    allocate_context,
    get_context,
    get_contexts,
    get_destination_file_name_information,
    get_file_name_information,
    get_file_name_information_unsafe,
    reference_context,
    release_context,
    set_context,
)

log = logging.getLogger("fltfuse.filters.ctx")

COUNTERS = ("opens", "reads", "writes", "bytes_read", "bytes_written", "cleanups", "closes")
_RENAME_EXCHANGE = 2  # renameat2's RENAME_EXCHANGE: both names change
_REQUEST_CONTEXTS = ContextType.INSTANCE | ContextType.STREAM | ContextType.STREAM_HANDLE
_REPORTED = ("serial", "name", "inode", "handle", "handles", *COUNTERS)
_serials = itertools.count(1)


def _counted(instance_context: Context, name: str, **fields: Any) -> Callable[[Context], None]:
    """An initializer for a file, stream or stream handle context: a serial, the name, ``fields``, and
    (but for a file context) the counters at zero.

    The context references the instance context (its cleanup gives it back)
    and counts in its ``allocated``.
    """

    def initialize(context: Context) -> None:
        context.serial = next(_serials)
        context.name = name
        context.instance_context = instance_context
        if context.context_type is not ContextType.FILE:
            for counter in COUNTERS:
                setattr(context, counter, 0)
        for key, value in fields.items():
            setattr(context, key, value)
        reference_context(instance_context)
        instance_context.allocated[context.context_type.name] += 1

    return initialize


def _name(cbd: CallbackData, objects: RelatedObjects, name_format: NameFormat) -> str | None:
    try:
        return get_file_name_information(cbd, objects, name_format).name
    except FileNameError as exc:
        log.debug("no %s name for %r: %s", name_format.name, cbd, exc)
        return None


def _count(contexts: dict[ContextType, Context], amounts: dict[str, int]) -> None:
    """Add ``amounts`` to the counters of each of ``contexts`` (the instance's totals among them), then release them."""
    for context in contexts.values():
        for counter, amount in amounts.items():
            setattr(context, counter, getattr(context, counter) + amount)
        release_context(context)


# -- operation callbacks --------------------------------------------------------------------


def post_create(cbd: CallbackData, objects: RelatedObjects, context: Any, flags: PostopFlags) -> PostopCallbackStatus:
    """A handle was opened: find or create the stream and file contexts, set a stream handle context."""
    p = cbd.iopb.parameters
    assert isinstance(p, CreateParameters)
    if flags & PostopFlags.DRAINING or cbd.io_status.status != NtStatus.SUCCESS or p.handle is None:
        return PostopCallbackStatus.FINISHED_PROCESSING
    instance_context = get_context(objects, ContextType.INSTANCE)
    if instance_context is None:
        return PostopCallbackStatus.FINISHED_PROCESSING
    name = _name(cbd, objects, NameFormat.NORMALIZED) or ""
    opened = _name(cbd, objects, NameFormat.OPENED) or name
    file_object = cbd.iopb.target_file_object
    stream = find_or_create_context(
        objects, ContextType.STREAM, _counted(instance_context, name, inode=file_object.inode)
    )
    if name:
        stream.name = name  # refreshed at each open, as the Windows sample does
    instance_context.streams[file_object.inode] = stream
    file = find_or_create_context(objects, ContextType.FILE, _counted(instance_context, name, handles=0))
    file.handles += 1
    release_context(file)
    handle = find_or_create_context(
        objects, ContextType.STREAM_HANDLE, _counted(instance_context, opened, handle=file_object.handle)
    )
    _count(
        {ContextType.INSTANCE: instance_context, ContextType.STREAM: stream, ContextType.STREAM_HANDLE: handle},
        {"opens": 1},
    )
    return PostopCallbackStatus.FINISHED_PROCESSING


def post_read_write(
    cbd: CallbackData, objects: RelatedObjects, context: Any, flags: PostopFlags
) -> PostopCallbackStatus:
    """Count a READ or WRITE that succeeded, and its bytes, for the handle, the stream and the instance."""
    if flags & PostopFlags.DRAINING or cbd.io_status.status != NtStatus.SUCCESS:
        return PostopCallbackStatus.FINISHED_PROCESSING
    p = cbd.iopb.parameters
    if isinstance(p, ReadParameters):
        amounts = {"reads": 1, "bytes_read": len(p.data or b"")}
    else:
        amounts = {"writes": 1, "bytes_written": cbd.io_status.information}
    _count(get_contexts(objects, _REQUEST_CONTEXTS), amounts)
    return PostopCallbackStatus.FINISHED_PROCESSING


def pre_cleanup(cbd: CallbackData, objects: RelatedObjects) -> PreopCallbackStatus:
    """Count a close(2) of a descriptor of the handle."""
    _count(get_contexts(objects, _REQUEST_CONTEXTS), {"cleanups": 1})
    return PreopCallbackStatus.SUCCESS_NO_CALLBACK


def pre_close(cbd: CallbackData, objects: RelatedObjects) -> PreopCallbackStatus:
    """Count the handle's release; the file has one handle less (the handle's context goes after the CLOSE)."""
    contexts = get_contexts(objects, _REQUEST_CONTEXTS | ContextType.FILE)
    file = contexts.pop(ContextType.FILE, None)
    if file is not None:
        file.handles = max(0, file.handles - 1)
        release_context(file)
    _count(contexts, {"closes": 1})
    return PreopCallbackStatus.SUCCESS_NO_CALLBACK


def pre_set_information(cbd: CallbackData, objects: RelatedObjects) -> tuple[PreopCallbackStatus, Any]:
    """Before a rename: the names that will change (the source, and for an exchange the destination)."""
    p = cbd.iopb.parameters
    if not isinstance(p, RenameParameters):
        return PreopCallbackStatus.SUCCESS_NO_CALLBACK, None
    changing = [_name(cbd, objects, NameFormat.NORMALIZED)]
    if p.flags & _RENAME_EXCHANGE:
        try:
            changing.append(get_destination_file_name_information(cbd, objects).name)
        except FileNameError as exc:
            log.debug("no destination name for %r: %s", cbd, exc)
    names = tuple(name for name in changing if name)
    if not names:
        return PreopCallbackStatus.SUCCESS_NO_CALLBACK, None
    return PreopCallbackStatus.SUCCESS_WITH_CALLBACK, names


def post_set_information(
    cbd: CallbackData, objects: RelatedObjects, changing: tuple[str, ...], flags: PostopFlags
) -> PostopCallbackStatus:
    """After a rename: query the name again for each stream context whose name was, or was below, a changed one."""
    if flags & PostopFlags.DRAINING or cbd.io_status.status != NtStatus.SUCCESS:
        return PostopCallbackStatus.FINISHED_PROCESSING
    instance_context = get_context(objects, ContextType.INSTANCE)
    if instance_context is None:
        return PostopCallbackStatus.FINISHED_PROCESSING
    for inode, stream in list(instance_context.streams.items()):
        if any(stream.name == old or stream.name.startswith(old + "/") for old in changing):
            try:
                stream.name = get_file_name_information_unsafe(objects, FileObject(inode)).name
            except FileNameError as exc:
                log.debug("no new name for inode %d after a rename: %s", inode, exc)
    release_context(instance_context)
    return PostopCallbackStatus.FINISHED_PROCESSING


# -- context cleanup: the reports ---------------------------------------------------------------


def cleanup(context: Context, context_type: ContextType) -> None:
    """Report what the context saw (one log line), and give back its reference to the instance context."""
    if context_type is ContextType.INSTANCE:
        report: dict[str, Any] = {
            "volume": context.volume,
            "totals": {counter: getattr(context, counter) for counter in COUNTERS},
            "allocated": dict(context.allocated),
            "cleaned": dict(context.cleaned),
        }
        log.info("ctx: INSTANCE context cleanup %s", json.dumps(report, sort_keys=True))
        return
    report = {key: getattr(context, key) for key in _REPORTED if hasattr(context, key)}
    log.info("ctx: %s context cleanup %s", context_type.name, json.dumps(report, sort_keys=True))
    instance_context = context.instance_context
    if context_type is ContextType.STREAM and instance_context.streams.get(context.inode) is context:
        del instance_context.streams[context.inode]
    instance_context.cleaned[context_type.name] += 1
    release_context(instance_context)


# -- instance and filter callbacks ------------------------------------------------------------------


def instance_setup(
    objects: RelatedObjects, flags: InstanceSetupFlags, volume_device_type: str, volume_filesystem_type: str
) -> NtStatus:
    """Set the instance context: the volume's name, zero totals, nothing allocated yet."""
    instance_context = allocate_context(objects, ContextType.INSTANCE)
    instance_context.volume = objects.volume.mount_point if objects.volume is not None else ""
    for counter in COUNTERS:
        setattr(instance_context, counter, 0)
    instance_context.allocated = Counter()
    instance_context.cleaned = Counter()
    instance_context.streams = {}
    set_context(objects, instance_context)
    release_context(instance_context)
    return NtStatus.SUCCESS


def instance_query_teardown(objects: RelatedObjects, flags: int) -> NtStatus:
    return NtStatus.SUCCESS  # fltmc detach may take an instance away: its contexts are cleaned up


def filter_unload(flags: FilterUnloadFlags) -> NtStatus:
    return NtStatus.SUCCESS


_CONTEXTS = ContextType.INSTANCE, ContextType.FILE, ContextType.STREAM, ContextType.STREAM_HANDLE

REGISTRATION = FilterRegistration(
    operations=(
        OperationRegistration(MajorFunction.CREATE, post=post_create),
        OperationRegistration(MajorFunction.READ, post=post_read_write),
        OperationRegistration(MajorFunction.WRITE, post=post_read_write),
        OperationRegistration(MajorFunction.CLEANUP, pre_cleanup),
        OperationRegistration(MajorFunction.CLOSE, pre_close),
        OperationRegistration(MajorFunction.SET_INFORMATION, pre_set_information, post_set_information),
    ),
    contexts=tuple(ContextRegistration(context_type, cleanup) for context_type in _CONTEXTS),
    instance_setup=instance_setup,
    instance_query_teardown=instance_query_teardown,
    filter_unload=filter_unload,
)
