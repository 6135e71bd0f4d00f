"""Filter-initiated I/O: requests an instance makes itself, seen only by the instances below it.

Windows counterparts: ``FltCreateFile``, ``FltReadFile``, ``FltWriteFile``,
``FltQueryInformationFile``, ``FltSetInformationFile``, ``FltFlushBuffers``,
``FltClose``, ``FltCancelFileOpen``, ``FltAllocateCallbackData``, ``FltPerformSynchronousIo`` and
``FltPerformAsynchronousIo``.

Every call takes the initiating instance's related objects (``objects``).
Its request starts just below that instance: the instances above it and the
instance itself never see it, the ones below see
``CallbackDataFlags.GENERATED_IO`` and ``cbd.initiator``. With
``top_of_stack=True`` the request starts at the top of the stack instead, like
a Zw* call on Windows; it is flagged ``TOP_OF_STACK_IO`` as well, and when it
comes back down to its own initiator it passes that instance by (logged and
counted in ``Instance.recursions``) instead of re-entering it: a callback that
issues top-of-stack I/O cannot recurse into itself or deadlock on its own
locks.

A file opened with :func:`create_file` is the initiator's own handle: the
kernel does not know it, its requests (read, write, query, set, flush) go
below the instance that makes them, and :func:`close_file` closes it (CLEANUP
and CLOSE below, then the volume forgets the inode, as the kernel would).
Failures raise ``OSError`` with the errno a process would get; the request's
full outcome is in the callback data for :func:`perform_io_synchronously`.
"""

from __future__ import annotations

import errno
import os
import stat as _stat
from collections.abc import Callable
from typing import Any

import trio

from .._callback_data import (
    CallbackData,
    CleanupParameters,
    CloseParameters,
    CreateDisposition,
    CreateParameters,
    FileAttributes,
    FileObject,
    FileType,
    FlushBuffersParameters,
    LookupParameters,
    Parameters,
    QueryInformationParameters,
    ReadParameters,
    Requestor,
    SetAttributesParameters,
    WriteParameters,
)
from .._status import NtStatus, errno_from_status

_ROOT = 1


def _stack(objects: Any) -> Any:
    stack = objects.instance.stack
    if stack is None:
        raise OSError(errno.ENODEV, f"instance {objects.instance.name} is not attached to a volume")
    return stack


def _daemon() -> Requestor:
    """Filter-initiated I/O is the daemon's own: its pid and ids."""
    return Requestor(os.getpid(), os.geteuid(), os.getegid(), 0)


def _raise_for(cbd: CallbackData, what: str) -> None:
    status = cbd.io_status.status
    if status >= 0x80000000:
        code = errno_from_status(status) or errno.EIO
        raise OSError(code, f"{what}: {os.strerror(code)} ({NtStatus(status).name})")


def allocate_callback_data(objects: Any, file_object: FileObject, parameters: Parameters) -> CallbackData:
    """FltAllocateCallbackData: a request on ``file_object``, to be filled in and performed.

    The caller may change ``cbd.iopb.parameters`` before performing it. The
    request is the daemon's own (``requestor`` is its pid and ids).
    """
    _stack(objects)
    return CallbackData(file_object, parameters, _daemon())


async def perform_io_synchronously(objects: Any, cbd: CallbackData, *, top_of_stack: bool = False) -> None:
    """FltPerformSynchronousIo: send ``cbd`` below the instance (or to the top) and wait for its outcome.

    The outcome is in ``cbd.io_status`` and the parameters' output fields; this
    raises only if the instance is not attached.
    """
    await _stack(objects).dispatch_generated(cbd, objects.instance, top_of_stack=top_of_stack)


def perform_io_asynchronously(
    objects: Any,
    cbd: CallbackData,
    completion: Callable[[CallbackData, Any], Any],
    context: Any = None,
    *,
    top_of_stack: bool = False,
) -> None:
    """FltPerformAsynchronousIo: start ``cbd`` and return; ``completion(cbd, context)`` runs when it is done.

    Call it from the trio thread (any callback or trio task of the daemon).
    ``completion`` may be a plain function or a coroutine function; one that
    raises is logged with the filter's name.
    """
    stack = _stack(objects)
    instance = objects.instance

    async def run() -> None:
        await stack.dispatch_generated(cbd, instance, top_of_stack=top_of_stack)
        try:
            result = completion(cbd, context)
            if hasattr(result, "__await__"):
                await result
        except Exception as exc:
            stack._bug(instance, cbd, f"asynchronous I/O completion raised {exc!r}", exc, contain=True)

    trio.lowlevel.spawn_system_task(run, name=f"{instance.filter.name}: asynchronous I/O")


async def _generated(
    objects: Any, file_object: FileObject, parameters: Parameters, what: str, top_of_stack: bool
) -> CallbackData:
    cbd = allocate_callback_data(objects, file_object, parameters)
    await perform_io_synchronously(objects, cbd, top_of_stack=top_of_stack)
    _raise_for(cbd, what)
    return cbd


def _path_parts(path: str | bytes) -> list[bytes]:
    raw = os.fsencode(path)
    parts = [part for part in raw.split(b"/") if part and part != b"."]
    if b".." in parts:
        raise OSError(errno.EINVAL, f"{raw!r}: '..' is not allowed in a filter's path")
    return parts


async def create_file(
    objects: Any,
    path: str | bytes,
    flags: int = os.O_RDONLY,
    mode: int = 0o644,
    *,
    top_of_stack: bool = False,
) -> FileObject:
    """FltCreateFile: open (or with O_CREAT create) ``path``, from the volume root, for the instance's own use.

    Each directory in the path is looked up below the instance (LOOKUP
    requests the instances below see), then the file is opened (CREATE with
    disposition OPEN or OVERWRITE) or made (CREATE, OPEN_IF or OVERWRITE_IF
    with ``mode``). A directory is opened when it is one (or O_DIRECTORY);
    ``O_DIRECTORY | O_CREAT`` makes it first if it is missing (FILE_DIRECTORY_FILE
    with FILE_OPEN_IF).
    Returns the open FileObject; close it with :func:`close_file`.
    """
    stack = _stack(objects)
    parts = _path_parts(path)
    if not parts:
        raise OSError(errno.EISDIR, "the volume root cannot be opened by a filter")
    looked_up: list[int] = []  # the lookups the volume counted; given back when done
    try:
        parent = _ROOT
        for part in parts[:-1]:
            lookup = LookupParameters(parent, part)
            await _generated(objects, FileObject(parent), lookup, f"lookup of {part!r}", top_of_stack)
            assert lookup.attributes is not None
            if not _stat.S_ISDIR(lookup.attributes.mode):
                looked_up.append(lookup.attributes.ino)
                raise OSError(errno.ENOTDIR, f"{os.fsdecode(path)!r}: {part!r} is not a directory")
            parent = lookup.attributes.ino
            looked_up.append(parent)
        name = parts[-1]
        existing: FileAttributes | None = None
        lookup = LookupParameters(parent, name)
        cbd = allocate_callback_data(objects, FileObject(parent), lookup)
        await perform_io_synchronously(objects, cbd, top_of_stack=top_of_stack)
        if cbd.io_status.status == NtStatus.OBJECT_NAME_NOT_FOUND and flags & os.O_CREAT:
            pass
        else:
            _raise_for(cbd, f"lookup of {os.fsdecode(path)!r}")
            existing = lookup.attributes
        file_object = await _open(objects, parent, name, existing, flags, mode, top_of_stack)
    finally:
        for ino in looked_up:
            _forget(stack, ino)
    return file_object


async def _open(
    objects: Any,
    parent: int,
    name: bytes,
    existing: FileAttributes | None,
    flags: int,
    mode: int,
    top_of_stack: bool,
) -> FileObject:
    stack = _stack(objects)
    requestor = _daemon()
    if existing is None and flags & os.O_DIRECTORY:  # a directory to make (mkdir), then open
        made = CreateParameters(
            CreateDisposition.CREATE, FileType.DIRECTORY, os.O_DIRECTORY, parent, name, _stat.S_IMODE(mode)
        )
        await _generated(objects, FileObject(parent, None, 0, requestor), made, f"mkdir {name!r}", top_of_stack)
        existing = made.attributes  # the lookup the volume counted for it is this open's
        assert existing is not None
    if existing is None:  # not there, and O_CREAT
        disposition = CreateDisposition.for_open(flags, exists=False)
        file_object = FileObject(parent, None, flags, requestor)
        params = CreateParameters(
            disposition, FileType.REGULAR, flags, parent, name, _stat.S_IMODE(mode), handle_requested=True
        )
    else:
        if flags & os.O_CREAT and flags & os.O_EXCL:
            _forget(stack, existing.ino)
            raise OSError(errno.EEXIST, f"{os.fsdecode(name)!r} exists")
        directory = _stat.S_ISDIR(existing.mode)
        if not directory and flags & os.O_DIRECTORY:
            _forget(stack, existing.ino)
            raise OSError(errno.ENOTDIR, f"{os.fsdecode(name)!r} is not a directory")
        if not directory and not _stat.S_ISREG(existing.mode):
            _forget(stack, existing.ino)
            raise OSError(errno.EINVAL, f"{os.fsdecode(name)!r}: a filter opens only regular files and directories")
        file_object, params = _open_existing(existing.ino, directory, flags, requestor)
    file_object.link = (parent, name)
    try:
        await _perform_open(objects, file_object, params, f"open of {os.fsdecode(name)!r}", top_of_stack)
    except OSError:
        if existing is not None:
            _forget(stack, existing.ino)
        raise
    return file_object


def _open_existing(
    inode: int, directory: bool, flags: int, requestor: Requestor
) -> tuple[FileObject, CreateParameters]:
    file_object = FileObject(inode, None, flags | (os.O_DIRECTORY if directory else 0), requestor)
    disposition = CreateDisposition.OPEN if directory else CreateDisposition.for_open(flags, exists=True)
    file_type = FileType.DIRECTORY if directory else FileType.REGULAR
    return file_object, CreateParameters(disposition, file_type, flags, handle_requested=True)


async def _perform_open(
    objects: Any, file_object: FileObject, params: CreateParameters, what: str, top_of_stack: bool
) -> None:
    """Send the CREATE that opens ``file_object`` for the instance; raises OSError if it failed."""
    file_object.uncached = True  # the instance's I/O goes straight to the file system, never the page cache
    file_object.initiator = objects.instance
    file_object.creating = True
    cbd = allocate_callback_data(objects, file_object, params)
    try:
        await perform_io_synchronously(objects, cbd, top_of_stack=top_of_stack)
    finally:
        file_object.creating = False
    _raise_for(cbd, what)
    file_object.handle = params.handle


async def open_file_by_id(
    objects: Any, inode: int, flags: int = os.O_RDONLY, *, top_of_stack: bool = False
) -> FileObject:
    """FltCreateFileEx with FILE_OPEN_BY_FILE_ID: open the regular file or directory ``inode`` by its id.

    ``inode`` must be one the volume knows (the target of a request in hand,
    or a file the instance opened). The open counts a lookup of it, which
    :func:`close_file` gives back. Raises OSError: ESTALE for an inode the
    volume does not know, EINVAL for what is neither a regular file nor a
    directory, or the open's own error.
    """
    stack = _stack(objects)
    if not stack.backend.add_lookups(inode, 1):
        raise OSError(errno.ESTALE, f"inode {inode} is not known to the volume")
    try:
        attributes = await query_information_file(objects, FileObject(inode), top_of_stack=top_of_stack)
        directory = _stat.S_ISDIR(attributes.mode)
        if not directory and not _stat.S_ISREG(attributes.mode):
            raise OSError(errno.EINVAL, f"inode {inode}: a filter opens only regular files and directories")
        file_object, params = _open_existing(inode, directory, flags, _daemon())
        await _perform_open(objects, file_object, params, f"open of inode {inode}", top_of_stack)
    except BaseException:
        _forget(stack, inode)
        raise
    return file_object


def _forget(stack: Any, ino: int) -> None:
    """Give back one lookup the volume counted for filter-initiated I/O (as the kernel's FORGET would)."""
    if stack.backend.forget(ino, 1):
        stack.contexts.inode_forgotten(ino)
        stack.names.purge(ino)


async def read_file(
    objects: Any, file_object: FileObject, offset: int, length: int, *, top_of_stack: bool = False
) -> bytes:
    """FltReadFile: up to ``length`` bytes at ``offset`` (short at the end of the file)."""
    params = ReadParameters(offset, length)
    await _generated(objects, file_object, params, "read", top_of_stack)
    return bytes(params.data or b"")


async def write_file(
    objects: Any, file_object: FileObject, offset: int, data: bytes, *, top_of_stack: bool = False
) -> int:
    """FltWriteFile: write ``data`` at ``offset``; returns the count written."""
    cbd = await _generated(objects, file_object, WriteParameters(offset, data), "write", top_of_stack)
    return cbd.io_status.information


async def query_information_file(
    objects: Any, file_object: FileObject, *, top_of_stack: bool = False
) -> FileAttributes:
    """FltQueryInformationFile: the file's attributes."""
    params = QueryInformationParameters()
    await _generated(objects, file_object, params, "query information", top_of_stack)
    assert params.attributes is not None
    return params.attributes


async def set_information_file(
    objects: Any, file_object: FileObject, params: SetAttributesParameters, *, top_of_stack: bool = False
) -> FileAttributes:
    """FltSetInformationFile: change size, mode, owner or times; returns the attributes after."""
    await _generated(objects, file_object, params, "set information", top_of_stack)
    assert params.attributes is not None
    return params.attributes


async def flush_buffers(objects: Any, file_object: FileObject, *, top_of_stack: bool = False) -> None:
    """FltFlushBuffers: fsync(2) the file."""
    directory = bool(file_object.flags & os.O_DIRECTORY)
    await _generated(objects, file_object, FlushBuffersParameters(False, directory), "flush", top_of_stack)


async def cancel_file_open(objects: Any, cbd: CallbackData, status: NtStatus = NtStatus.ACCESS_DENIED) -> None:
    """FltCancelFileOpen: from a post-CREATE, undo the open the file system made and fail the request.

    The instances below see CLEANUP and CLOSE for the handle (their stream
    handle contexts go), then the request completes with ``status`` (an error
    status). A CREATE that made a new object leaves it made, as on Windows; the
    volume gives back the lookup the kernel will never get.
    """
    params = cbd.iopb.parameters
    target = cbd.iopb.target_file_object
    if not isinstance(params, CreateParameters) or target.handle is None or cbd.io_status.status >= 0x80000000:
        raise OSError(errno.EINVAL, f"cancel_file_open needs a CREATE that opened a handle, not {cbd!r}")
    if not NtStatus(status).is_error:
        raise ValueError(f"cancel_file_open fails the open: {status!r} is not an error status")
    stack = _stack(objects)
    handle = target.handle
    for close in (CleanupParameters(), CloseParameters(params.file_type is FileType.DIRECTORY)):
        await perform_io_synchronously(objects, allocate_callback_data(objects, target, close))
    stack.contexts.handle_closed(handle)
    if params.name:  # the file system made or opened it by name: the kernel never gets the entry
        _forget(stack, target.inode)
    cbd.io_status.status = status
    cbd.io_status.information = 0


async def close_file(objects: Any, file_object: FileObject, *, top_of_stack: bool = False) -> None:
    """FltClose: CLEANUP and CLOSE below the instance; its stream handle contexts go, then its inode lookup."""
    if file_object.initiator is None:
        raise OSError(errno.EINVAL, f"{file_object!r} was not opened by create_file: its opener closes it")
    if file_object.handle is None or file_object.closed:
        raise OSError(errno.EBADF, f"{file_object!r} is not open")
    stack = _stack(objects)
    for params in (CleanupParameters(), CloseParameters(bool(file_object.flags & os.O_DIRECTORY))):
        cbd = allocate_callback_data(objects, file_object, params)
        await perform_io_synchronously(objects, cbd, top_of_stack=top_of_stack)
    stack.contexts.handle_closed(file_object.handle)
    _forget(stack, file_object.inode)
