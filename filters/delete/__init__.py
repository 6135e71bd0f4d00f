"""delete: report each deletion of a file or directory once, with its name, when the object is really gone.

A port of Windows' delete minifilter sample (``filesys/miniFilter/delete``).

Design and operation
--------------------

On Linux a name goes at ``unlink(2)``, ``rmdir(2)`` or a ``rename(2)`` onto
it, but the object goes only when its last name is gone and nothing holds it
open: the data of an unlinked file lives until its last handle is closed,
and a file with another hard link is not deleted at all. The filter manager
sees that moment: the kernel forgets the inode (FUSE FORGET) once it has no
name and no user left, and the file's stream context is cleaned up then.
So the filter marks an object "delete pending" with a stream context when its
last name goes, and reports the deletion in that context's cleanup:

* **pre-SET_INFORMATION** of a DISPOSITION (unlink, rmdir) or of a rename
  that may replace its destination (no RENAME_NOREPLACE or
  RENAME_EXCHANGE): the name of the object that may lose a name (a name
  query: the source, or the rename's destination), and the object itself,
  opened below the instance for its attributes only (``create_file`` with
  ``O_PATH``, the Windows sample's open by file id). Nothing there (ENOENT),
  or not a regular file or directory (``create_file`` opens no symbolic
  link, device, FIFO or socket): no post.
* **post-SET_INFORMATION**, if the request succeeded: the object's link
  count (``query_information_file``). At 0 its last name is gone: the
  filter finds or creates the object's stream context (KEEP_IF_EXISTS:
  two of its names removed at once mark it once) and records the name and
  whether it is a directory. Either way the filter closes its handle
  (``close_file``).
* **stream context cleanup** (the kernel forgot the inode: the last handle
  was closed, or no handle was open; or the volume is unmounted): one log
  line, ``delete: deleted {json}`` with ``name``, ``kind`` (``file`` or
  ``directory``) and ``inode`` (logger ``fltfuse.filters.delete``, INFO).

Exactly once: only a request that succeeded marks a file, so of eight
``unlink(2)`` of one name racing, the one ext4 performs marks it and the
seven that fail (ENOENT) do not; a file has at most one stream context per
instance, and its cleanup runs once. A failed request (ENOENT, EISDIR,
ENOTEMPTY, EACCES ...) reports nothing, a file with a link left reports
nothing until its last link goes, and a replaced rename destination is
reported under the destination name.

Differences from the Windows sample: there are no alternate data streams
(no stream deletions to tell from file deletions) and no transactions. The
Windows sample does not cover a rename onto an existing file; this port
does. Symbolic links, devices, FIFOs and sockets are not reported (a filter
cannot open them to learn their inode). An object removed behind the
volume's back (in the backing directory) is not reported.
"""

from __future__ import annotations

import json
import logging
import os
import stat
from typing import Any

from filters._contexts import find_or_create_context
from fltfuse import (
    CallbackData,
    Context,
    ContextError,
    ContextRegistration,
    ContextType,
    DispositionParameters,
    FileNameError,
    FileNameInformation,
    FileObject,
    FilterRegistration,
    FilterUnloadFlags,
    MajorFunction,
    NtStatus,
    OperationRegistration,
    PostopCallbackStatus,
    PostopFlags,
    PreopCallbackStatus,
    RelatedObjects,
    RenameParameters,
    close_file,
    create_file,
    get_destination_file_name_information,
    get_file_name_information,
    query_information_file,
    release_context,
)

log = logging.getLogger("fltfuse.filters.delete")

_RENAME_KEEPS_DESTINATION = 0x1 | 0x2  # RENAME_NOREPLACE (fails if it exists), RENAME_EXCHANGE (keeps it)


def _losing_a_name(cbd: CallbackData, objects: RelatedObjects) -> FileNameInformation | None:
    """The name a request removes if it succeeds: unlink's or rmdir's target, a rename's destination."""
    p = cbd.iopb.parameters
    if isinstance(p, DispositionParameters):
        return get_file_name_information(cbd, objects)
    if isinstance(p, RenameParameters) and not p.flags & _RENAME_KEEPS_DESTINATION:
        return get_destination_file_name_information(cbd, objects)
    return None


async def pre_set_information(cbd: CallbackData, objects: RelatedObjects) -> Any:
    """Open (for its attributes) the object that may lose its last name; its post checks what is left."""
    try:
        name = _losing_a_name(cbd, objects)
        if name is None:
            return PreopCallbackStatus.SUCCESS_NO_CALLBACK
        candidate = await create_file(objects, name.parent_dir + name.final_component, os.O_PATH)
    except (FileNameError, OSError) as exc:
        log.debug("nothing to watch for %r: %s", cbd, exc)  # no such name, or not a file or directory
        return PreopCallbackStatus.SUCCESS_NO_CALLBACK
    return PreopCallbackStatus.SUCCESS_WITH_CALLBACK, (candidate, name.name)


async def post_set_information(
    cbd: CallbackData, objects: RelatedObjects, candidate: tuple[FileObject, str], flags: PostopFlags
) -> PostopCallbackStatus:
    """If the request succeeded and the object has no link left, mark it delete pending; close it either way."""
    file_object, name = candidate
    try:
        if not flags & PostopFlags.DRAINING and cbd.io_status.status == NtStatus.SUCCESS:
            attributes = await query_information_file(objects, file_object)
            if attributes.nlink == 0:
                _mark_delete_pending(objects, file_object, name, attributes.mode)
    except (OSError, ContextError) as exc:
        log.error("could not check %s after %r: %s", name, cbd, exc)
    finally:
        try:
            await close_file(objects, file_object)
        except OSError as exc:
            log.error("could not close %s: %s", name, exc)
    return PostopCallbackStatus.FINISHED_PROCESSING


def _mark_delete_pending(objects: RelatedObjects, file_object: FileObject, name: str, mode: int) -> None:
    """Give the object a stream context (if it has none): its cleanup reports the deletion."""

    def initialize(context: Context) -> None:
        context.inode = file_object.inode

    stream = find_or_create_context(objects._replace(file_object=file_object), ContextType.STREAM, initialize)
    stream.name = name  # the last name it had
    stream.kind = "directory" if stat.S_ISDIR(mode) else "file"
    release_context(stream)


def cleanup(context: Context, context_type: ContextType) -> None:
    """The object is gone (forgotten by the kernel): report its deletion."""
    report = {"name": context.name, "kind": context.kind, "inode": context.inode}
    log.info("delete: deleted %s", json.dumps(report, sort_keys=True))


def instance_query_teardown(objects: RelatedObjects, flags: int) -> NtStatus:
    return NtStatus.SUCCESS  # fltmc detach: objects marked and not yet gone are reported then


def filter_unload(flags: FilterUnloadFlags) -> NtStatus:
    return NtStatus.SUCCESS


REGISTRATION = FilterRegistration(
    operations=(OperationRegistration(MajorFunction.SET_INFORMATION, pre_set_information, post_set_information),),
    contexts=(ContextRegistration(ContextType.STREAM, cleanup),),
    instance_query_teardown=instance_query_teardown,
    filter_unload=filter_unload,
)
