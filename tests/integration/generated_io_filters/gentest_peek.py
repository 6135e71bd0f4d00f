"""gentest_peek: reads the first bytes of files opened under a directory, and writes or makes files on request.

Everything it does to files is filter-initiated I/O, so only the instances
below it see it:

* post-CREATE of a regular file opened for reading under ``PeekPath`` (a
  directory from the volume root): it reads the first ``PeekBytes`` bytes
  through the caller's own handle and logs ``gentest peek: <path> starts with
  <bytes>``;
* ``setxattr(any file, "user.gentest.write", b"<path>\\0<data>")``: it opens
  ``<path>`` (from the volume root) for writing with ``create_file``, writes
  ``<data>`` at offset 0 and closes it; ``user.gentest.create`` does the same
  with O_CREAT|O_EXCL (a new file, mode 0644). The setxattr is completed by the
  filter (nothing is stored) and fails with the errno the I/O failed with.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from fltfuse import (
    CallbackData,
    CreateParameters,
    EaMinor,
    FileNameError,
    FileType,
    FilterRegistration,
    FilterUnloadFlags,
    MajorFunction,
    NtStatus,
    OperationRegistration,
    PostopCallbackStatus,
    PostopFlags,
    PreopCallbackStatus,
    RelatedObjects,
    SetEaParameters,
    close_file,
    create_file,
    get_file_name_information,
    read_file,
    status_from_errno,
    write_file,
)

log = logging.getLogger("gentest.peek")

TRIGGERS = {b"user.gentest.write": os.O_WRONLY, b"user.gentest.create": os.O_WRONLY | os.O_CREAT | os.O_EXCL}


def _path_of(cbd: CallbackData, objects: RelatedObjects) -> str | None:
    """The opened file's path from the volume root ("/peek/a.txt"), or None if it has no name."""
    try:
        info = get_file_name_information(cbd, objects)
    except FileNameError:
        return None
    return info.name[len(info.volume) :]


async def post_create(
    cbd: CallbackData, objects: RelatedObjects, context: Any, flags: PostopFlags
) -> PostopCallbackStatus:
    params = cbd.iopb.parameters
    assert isinstance(params, CreateParameters)
    if (
        flags & PostopFlags.DRAINING
        or cbd.io_status.status != NtStatus.SUCCESS
        or params.file_type is not FileType.REGULAR
        or params.handle is None
        or params.flags & os.O_ACCMODE == os.O_WRONLY
    ):
        return PostopCallbackStatus.FINISHED_PROCESSING
    path = _path_of(cbd, objects)
    prefix = "/" + str(objects.filter.parameters["PeekPath"]).strip("/") + "/"
    if path is not None and path.startswith(prefix):
        assert objects.file_object is not None
        length = int(objects.filter.parameters["PeekBytes"])
        try:
            first = await read_file(objects, objects.file_object, 0, length)
        except OSError as exc:
            log.warning("gentest peek: %s could not be read: %s", path, exc)
        else:
            log.info("gentest peek: %s starts with %r", path, first)
    return PostopCallbackStatus.FINISHED_PROCESSING


async def pre_set_ea(cbd: CallbackData, objects: RelatedObjects) -> PreopCallbackStatus:
    params = cbd.iopb.parameters
    assert isinstance(params, SetEaParameters)
    if params.minor is not EaMinor.SET or params.name not in TRIGGERS:
        return PreopCallbackStatus.SUCCESS_NO_CALLBACK
    path, _, data = bytes(params.value).partition(b"\0")
    try:
        file_object = await create_file(objects, path, TRIGGERS[params.name], 0o644)
        try:
            written = await write_file(objects, file_object, 0, data)
        finally:
            await close_file(objects, file_object)
    except OSError as exc:
        log.info("gentest peek: %s of %r failed: %s", params.name.decode(), path, exc)
        cbd.io_status.status = status_from_errno(exc.errno or 5)
    else:
        log.info("gentest peek: %s wrote %d bytes to %r", params.name.decode(), written, path)
        cbd.io_status.status = NtStatus.SUCCESS
    return PreopCallbackStatus.COMPLETE


def query_teardown(objects: Any, flags: int) -> NtStatus:
    return NtStatus.SUCCESS


def unload(flags: FilterUnloadFlags) -> NtStatus:
    return NtStatus.SUCCESS


REGISTRATION = FilterRegistration(
    filter_unload=unload,
    instance_query_teardown=query_teardown,
    operations=(
        OperationRegistration(MajorFunction.CREATE, post=post_create),
        OperationRegistration(MajorFunction.SET_EA, pre_set_ea),
    ),
)
